"""The Docker image and the Helm chart (issue 4: Dockerfile, .dockerignore, helm/mq9).

There is no Docker engine and no helm binary on the build machines, so:

- the chart is rendered and linted by ``helm-python-sdk`` (Helm's Go SDK through a shared
  library it ships: no helm binary, no network), and every rendered object is validated with
  ``kubernetes-validate`` (strict: unknown fields fail) for a recent Kubernetes version;
- the pods' start-up shell snippet is run with /bin/sh against a stand-in ``mq9`` that prints
  its arguments, for pod 0 and for a joining pod;
- the Dockerfile's instructions are parsed and checked, and what its entrypoint runs is run:
  a wheel built from exactly the files the Dockerfile copies, installed into a fresh venv,
  ``mq9 node --data-dir ...`` started from it; /healthz, the Dockerfile's HEALTHCHECK command,
  a NATS client and the chart's ``helm test`` script are all pointed at that node, and the
  fresh venv's own ``mq9 mailbox create``, ``send`` and ``sub`` (no extras installed) use it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate as kv
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "mq9"
DOCKERFILE = ROOT / "Dockerfile"
RELEASE, NAMESPACE = "demo", "agents"
FULLNAME = "demo-mq9"
HEADLESS = f"{FULLNAME}-headless"
DOMAIN = f"{HEADLESS}.{NAMESPACE}.svc.cluster.local"
# The oldest Kubernetes the chart targets (policy/v1 PDB, stable probes) and the newest
# schema kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kv.latest_version()]
IMAGE_UID = 10001

SCENARIOS = {
    "defaults": {},
    "one-replica": {"replicaCount": 1},
    "loadbalancer": {"service": {"type": "LoadBalancer", "nodePort": 30422,
                                 "loadBalancerSourceRanges": ["10.0.0.0/8"],
                                 "annotations": {"example.com/lb": "internal"}}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True,
                                                       "labels": {"release": "prom"}}}},
    "no-persistence-extras": {"persistence": {"enabled": False},
                              "podDisruptionBudget": {"enabled": False},
                              "podAntiAffinityPreset": "hard",
                              "mq9": {"shards": 3, "gateways": 1,
                                      "extraArgs": ["--max-msgs", "50000"],
                                      "extraEnv": [{"name": "MQ9_DEFAULT_TTL", "value": "60"}]},
                              "lameDuck": {"enabled": False},
                              "terminationGracePeriodSeconds": 30},
    "tls-auth-volumes": {"tls": {"enabled": True, "secretName": "mq9-tls", "caKey": "ca.crt",
                                 "verify": True},
                         "auth": {"enabled": True, "secretName": "mq9-auth", "key": "users.json"},
                         "tests": {"credentialsSecret": "mq9-test-user"},
                         "extraVolumes": [{"name": "plugins",
                                           "configMap": {"name": "mq9-plugins"}}],
                         "extraVolumeMounts": [{"name": "plugins", "mountPath": "/etc/plugins",
                                                "readOnly": True}]},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                               "prometheusRule": {"enabled": True,
                                                  "labels": {"release": "prom"}},
                               "grafanaDashboard": {"enabled": True,
                                                    "annotations": {"grafana_folder": "mq9"}}}},
}


# ---- rendering --------------------------------------------------------------------------

def render(values: dict | None = None) -> dict[str, list[dict]]:
    """Rendered objects by template file name (NOTES.txt under "NOTES.txt", as text)."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
    out: dict[str, list] = {}
    for path, text in manifests.items():
        name = path.split("/templates/", 1)[1]
        if name.endswith(".txt"):
            out[name] = [text]
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        if docs:
            out[name] = docs
    return out


def objects(rendered: dict) -> list[dict]:
    return [d for name, docs in rendered.items() if not name.endswith(".txt") for d in docs]


def one(rendered: dict, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(rendered) if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request):
    values = SCENARIOS[request.param]
    return request.param, values, render(values)


def statefulset(rendered):
    return one(rendered, "StatefulSet", FULLNAME)


def container(rendered):
    (c,) = statefulset(rendered)["spec"]["template"]["spec"]["containers"]
    return c


def data_ports(shards: int, gateways: int, base: int = 6222) -> dict[str, int]:
    ports = {"cluster": base}
    ports.update({f"shard-{i}": base + 1 + i for i in range(shards)})
    ports.update({f"gateway-{j}": base + 1 + shards + j for j in range(gateways)})
    return ports


# ---- chart: lint and schema -------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_chart_lints_clean(name):
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), SCENARIOS[name], strict=True, namespace=NAMESPACE,
                           kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings, errors
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_validates(scenario, version):
    name, _, rendered = scenario
    checked = 0
    for obj in objects(rendered):
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD kubernetes-validate has no schema for; checked field by field below
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {e.message} "
                        f"at {list(e.path)}")
        assert obj["metadata"]["namespace"] == NAMESPACE
        checked += 1
    assert checked >= 5


def test_default_objects():
    rendered = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects(rendered))
    assert kinds == sorted([
        ("StatefulSet", FULLNAME), ("Service", FULLNAME), ("Service", HEADLESS),
        ("Service", f"{FULLNAME}-metrics"), ("PodDisruptionBudget", FULLNAME),
        ("Pod", f"{FULLNAME}-test-request-reply"), ("Secret", f"{FULLNAME}-cluster"),
    ])
    notes = rendered["NOTES.txt"][0]
    assert f"{FULLNAME}.{NAMESPACE}.svc.cluster.local:4222" in notes
    assert "helm test" in notes and "mq9 cluster remove" in notes


# ---- chart: the important fields --------------------------------------------------------

def test_statefulset(scenario):
    name, values, rendered = scenario
    sts = statefulset(rendered)
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["replicas"] == values.get("replicaCount", 3)
    assert spec["serviceName"] == HEADLESS
    assert spec["podManagementPolicy"] == "OrderedReady"
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()

    # non-root, no privilege, read-only root (data and /tmp are volumes)
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == IMAGE_UID
    assert psc["fsGroup"] == IMAGE_UID
    c = container(rendered)
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    want = {"data": "/data", "tmp": "/tmp"}
    if values.get("tls", {}).get("enabled"):
        want["tls"] = "/etc/mq9/tls"
    if values.get("auth", {}).get("enabled"):
        want["auth"] = "/etc/mq9/auth"
    want.update({m["name"]: m["mountPath"] for m in values.get("extraVolumeMounts", [])})
    assert mounts == want
    assert c["resources"]["requests"]["memory"]

    # probes on the metrics port: /healthz, and /readyz for readiness
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # the metrics port answers only once every gateway takes clients, after the shards have
    # read their mailboxes back: a node with a million of them must not be killed mid-start
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600
    assert "initialDelaySeconds" not in c["livenessProbe"]  # the startup probe gates it

    # Service links would feed MQ9_PORT=tcp://... (a Service named mq9) to mq9's settings
    assert pod["enableServiceLinks"] is False

    # preStop: lame duck (or, off, a short sleep), then SIGTERM; the grace period covers
    # the hook and mq9's shutdown
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[:2] == ["/bin/sh", "-c"]
    grace = pod["terminationGracePeriodSeconds"]
    if values.get("lameDuck", {}).get("enabled", True):
        m = re.fullmatch(r"mq9 node --signal ldm --data-dir /data && sleep (\d+)", pre[2])
        assert m, pre
        env = {e["name"]: e.get("value") for e in c["env"]}
        duration = int(env["MQ9_LAME_DUCK_DURATION"])
        grace_period = int(env["MQ9_LAME_DUCK_GRACE_PERIOD"])
        assert (duration, grace_period) == (30, 10)
        assert int(m.group(1)) >= duration + grace_period
        assert grace > int(m.group(1)) + 15  # + mq9's shutdown
    else:
        sleep = int(re.fullmatch(r"sleep (\d+)", pre[2]).group(1))
        assert 0 < sleep < grace - 20

    # ports: NATS, metrics, and the data ports the node will open
    mq9 = values.get("mq9", {})
    shards, gateways = mq9.get("shards", 2), mq9.get("gateways", 2)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"nats": 4222, "metrics": 9090, **data_ports(shards, gateways)}

    # one PVC per pod, or an emptyDir when persistence is off
    volumes = {v["name"]: v for v in pod["volumes"]}
    if values.get("persistence", {}).get("enabled", True):
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data" and "data" not in volumes
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    else:
        assert "volumeClaimTemplates" not in spec and "emptyDir" in volumes["data"]


def test_services(scenario):
    name, values, rendered = scenario
    mq9 = values.get("mq9", {})
    headless = one(rendered, "Service", HEADLESS)["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    ports = {p["name"]: p["port"] for p in headless["ports"]}
    assert ports == {"nats": 4222, **data_ports(mq9.get("shards", 2), mq9.get("gateways", 2))}
    assert all(p["targetPort"] == p["name"] for p in headless["ports"])

    client = one(rendered, "Service", FULLNAME)["spec"]
    want_type = values.get("service", {}).get("type", "ClusterIP")
    assert client["type"] == want_type
    (port,) = client["ports"]  # NATS only: metrics and cluster ports stay private
    assert (port["name"], port["port"], port["targetPort"]) == ("nats", 4222, "nats")
    if want_type == "LoadBalancer":
        assert port["nodePort"] == 30422
        assert client["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    else:
        assert "nodePort" not in port

    metrics = one(rendered, "Service", f"{FULLNAME}-metrics")["spec"]
    assert metrics["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in metrics["ports"]] == [("metrics", 9090)]


def test_pdb(scenario):
    name, values, rendered = scenario
    pdbs = [o for o in objects(rendered) if o["kind"] == "PodDisruptionBudget"]
    if not values.get("podDisruptionBudget", {}).get("enabled", True):
        assert not pdbs
        return
    (pdb,) = pdbs
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == \
        statefulset(rendered)["spec"]["selector"]["matchLabels"]


def test_servicemonitor(scenario):
    name, values, rendered = scenario
    monitors = [o for o in objects(rendered) if o["kind"] == "ServiceMonitor"]
    if not values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        assert not monitors
        return
    (sm,) = monitors
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    svc = one(rendered, "Service", f"{FULLNAME}-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_helm_test_pod(scenario):
    name, _, rendered = scenario
    pod = one(rendered, "Pod", f"{FULLNAME}-test-request-reply")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["enableServiceLinks"] is False
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]
           for e in pod["spec"]["containers"][0]["env"]}
    want = {"NATS_HOST": f"{FULLNAME}.{NAMESPACE}.svc.cluster.local", "NATS_PORT": "4222"}
    if name == "tls-auth-volumes":  # TLS with the CA and, as tls.verify asks, a certificate
        want.update(NATS_TLS="1", NATS_TLS_CA="/etc/mq9/tls/ca.crt",
                    NATS_TLS_CERT="/etc/mq9/tls/tls.crt", NATS_TLS_KEY="/etc/mq9/tls/tls.key",
                    NATS_USER={"name": "mq9-test-user", "key": "user"},
                    NATS_PASS={"name": "mq9-test-user", "key": "password"})
        (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
        assert mount == {"name": "tls", "mountPath": "/etc/mq9/tls", "readOnly": True}
        assert pod["spec"]["volumes"] == [{"name": "tls", "secret": {"secretName": "mq9-tls"}}]
    assert env == want


# ---- chart: the pods' start-up command --------------------------------------------------

def run_startup(rendered, pod_name: str, tmp_path: Path) -> list[str]:
    """Run the container's command with /bin/sh, a stand-in `mq9` printing its argv."""
    c = container(rendered)
    assert c["command"][:2] == ["/bin/sh", "-c"]
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "mq9"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "POD_NAME": pod_name}
    out = subprocess.run(c["command"] + c.get("args", []), env=env, capture_output=True,
                         text=True, timeout=10, check=True)
    return json.loads(out.stdout)


def flag(argv: list[str], name: str) -> str | None:
    """The last value given to --name (argparse: the last one wins)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def test_pod_zero_bootstraps_others_join(tmp_path):
    rendered = render()
    env = {e["name"]: e for e in container(rendered)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for ordinal in range(4):
        pod = f"{FULLNAME}-{ordinal}"
        argv = run_startup(rendered, pod, tmp_path)
        assert argv[:3] == ["node", "--data-dir", "/data"]
        assert flag(argv, "--node-id") == pod
        assert flag(argv, "--advertise") == f"{pod}.{DOMAIN}"
        assert (flag(argv, "--port"), flag(argv, "--metrics-port")) == ("4222", "9090")
        assert flag(argv, "--cluster-port") == "6222"
        assert (flag(argv, "--shards"), flag(argv, "--gateways")) == ("2", "2")
        if ordinal == 0:
            assert "--join" not in argv
        else:
            assert flag(argv, "--join") == f"{FULLNAME}-0.{DOMAIN}:6222"


def test_cluster_secret_reaches_every_pod():
    """Cluster mode refuses to start without a secret: the chart makes one, or uses the
    user's Secret (and then makes none)."""
    rendered = render()
    made = one(rendered, "Secret", f"{FULLNAME}-cluster")
    assert made["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(made["data"]["cluster-secret"])) == 48
    env = {e["name"]: e for e in container(rendered)["env"]}
    ref = env["MQ9_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{FULLNAME}-cluster", "key": "cluster-secret"}
    rendered = render({"mq9": {"clusterSecret": {"existingSecret": "mine", "existingSecretKey": "k"}}})
    assert not [o for o in objects(rendered) if o["kind"] == "Secret"]
    env = {e["name"]: e for e in container(rendered)["env"]}
    assert env["MQ9_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}


def test_extra_args_reach_mq9(tmp_path):
    rendered = render(SCENARIOS["no-persistence-extras"])
    argv = run_startup(rendered, f"{FULLNAME}-1", tmp_path)
    assert flag(argv, "--max-msgs") == "50000"
    assert (flag(argv, "--shards"), flag(argv, "--gateways")) == ("3", "1")
    assert flag(argv, "--join") == f"{FULLNAME}-0.{DOMAIN}:6222"
    env = {e["name"]: e.get("value") for e in container(rendered)["env"]}
    assert env["MQ9_DEFAULT_TTL"] == "60"


def test_values_are_documented():
    text = (CHART / "values.yaml").read_text()
    with helm.Chart.load(str(CHART)) as chart:
        defaults = chart.values
    for key in defaults:  # every top-level setting has a comment right above it or its block
        block = re.search(rf"((?:^#.*\n)*)^{re.escape(key)}:", text, re.M)
        assert block, key
    assert text.count("# --") >= 30


def test_app_version_is_mq9_version():
    """The image the chart pulls by default, <repository>:<appVersion>, is the one built
    from this tree as `docker build -t mq9:<mq9.__version__> .`."""
    import mq9

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == mq9.__version__
    assert container(render())["image"] == f"mq9:{mq9.__version__}"
    assert container(render({"image": {"tag": "dev"}}))["image"] == "mq9:dev"


def test_tls_and_auth_secrets_are_mounted_whole():
    """Each Secret is one read-only directory (no subPath), so a renewed certificate or an
    edited users file reaches the running pod, ready for `mq9 node --signal reload`."""
    rendered = render(SCENARIOS["tls-auth-volumes"])
    volumes = {v["name"]: v for v in statefulset(rendered)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"] == {"name": "tls", "secret": {"secretName": "mq9-tls"}}
    assert volumes["auth"] == {"name": "auth", "secret": {"secretName": "mq9-auth"}}
    assert volumes["plugins"] == {"name": "plugins", "configMap": {"name": "mq9-plugins"}}
    mounts = {m["name"]: m for m in container(rendered)["volumeMounts"]}
    for name in ("tls", "auth", "plugins"):
        assert mounts[name]["readOnly"] is True and "subPath" not in mounts[name]
    env = {e["name"]: e.get("value") for e in container(rendered)["env"]}
    assert {k: v for k, v in env.items() if k.startswith(("MQ9_TLS", "MQ9_AUTH"))} == {
        "MQ9_TLS_CERT": "/etc/mq9/tls/tls.crt", "MQ9_TLS_KEY": "/etc/mq9/tls/tls.key",
        "MQ9_TLS_CA": "/etc/mq9/tls/ca.crt", "MQ9_TLS_VERIFY": "1",
        "MQ9_AUTH_FILE": "/etc/mq9/auth/users.json"}

    plain = render({"tls": {"enabled": True, "secretName": "s"}})  # no CA, no client certs
    env = {e["name"]: e.get("value") for e in container(plain)["env"]}
    assert "MQ9_TLS_CA" not in env and "MQ9_TLS_VERIFY" not in env
    assert env["MQ9_TLS_CERT"] == "/etc/mq9/tls/tls.crt"


def test_chart_settings_are_mq9_settings(tmp_path):
    """The MQ9_* variables the chart sets are read by mq9's own settings table, with the
    files they name in place (as the mounted Secrets put them)."""
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import certs

    from mq9 import config

    rendered = render(SCENARIOS["tls-auth-volumes"])
    env = {e["name"]: e["value"] for e in container(rendered)["env"]
           if e["name"].startswith("MQ9_") and "value" in e}
    root = tmp_path / "root"  # stands for the container's /
    ca = certs.CA(tmp_path / "ca")
    server = ca.issue("server", server=True)
    tls_dir = root / "etc/mq9/tls"
    tls_dir.mkdir(parents=True)
    shutil.copy(server.cert, tls_dir / "tls.crt")
    shutil.copy(server.key, tls_dir / "tls.key")
    shutil.copy(ca.pem, tls_dir / "ca.crt")
    (root / "etc/mq9/auth").mkdir(parents=True)
    (root / "etc/mq9/auth/users.json").write_text(json.dumps({"users": [
        {"user": "agent", "password": "secret-pass"}]}))
    environ = {k: f"{root}{v}" if v.startswith("/etc/") else v for k, v in env.items()}

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_args(parser.parse_args([]), environ)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (
        f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{tls_dir}/ca.crt")
    assert cfg.tls_verify is True
    assert cfg.auth_file == f"{root}/etc/mq9/auth/users.json"
    assert (cfg.log_level, cfg.fsync) == ("info", "never")
    # lame duck (helper C's settings): the preStop hook's timing is built on these values
    assert cfg.lame_duck_duration == 30 and cfg.lame_duck_grace_period == 10


@pytest.mark.parametrize("values, message", [
    ({"tls": {"enabled": True}}, "tls.secretName is required"),
    ({"auth": {"enabled": True}}, "auth.secretName is required"),
    ({"tls": {"enabled": True, "secretName": "s", "verify": True}}, "tls.verify needs tls.caKey"),
    ({"terminationGracePeriodSeconds": 60},
     "terminationGracePeriodSeconds (60) must exceed 65"),
    ({"lameDuck": {"durationSeconds": 120}}, "terminationGracePeriodSeconds (75) must exceed 155"),
    ({"lameDuck": {"durationSeconds": 10}}, "gracePeriodSeconds must be less than"),
    ({"lameDuck": {"enabled": False}, "terminationGracePeriodSeconds": 25},
     "terminationGracePeriodSeconds (25) must exceed 25"),
])
def test_values_mq9_would_refuse_fail_the_render(values, message):
    with pytest.raises(Exception) as e:
        render(values)
    assert message in str(e.value)


# ---- Dockerfile -------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def test_dockerfile_instructions():
    stage = final_stage()
    base = stage[0][1].split()[0]
    assert re.fullmatch(r"python:3\.1[12]-slim", base), base
    d = {}
    for word, args in stage:
        d.setdefault(word, []).append(args)

    (user,) = d["USER"]
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and int(uid) == IMAGE_UID  # the chart's runAsUser
    assert d["VOLUME"] == ["/data"]
    exposed = {p.split("/")[0] for args in d["EXPOSE"] for p in args.split()}
    assert {"4222", "9090", "6222"} <= exposed
    (entry,) = d["ENTRYPOINT"]
    command = exec_form(entry) + exec_form(d.get("CMD", ["[]"])[-1])
    assert command == ["mq9", "node", "--data-dir", "/data"]

    (hc,) = d["HEALTHCHECK"]
    assert "curl" not in hc and "wget" not in hc
    # `mq9 health` on the entrypoint's data dir: it reads the node's ports from there, so a
    # `docker run mq9 --metrics-port 9191` (or MQ9_METRICS_PORT) is checked on its own port
    assert healthcheck_command() == ["mq9", "health", "--data-dir", command[command.index("--data-dir") + 1]]

    # the user exists and owns /data before VOLUME, so a new named volume is writable
    install = " ".join(d["RUN"])
    assert f"--uid {IMAGE_UID}" in install and "chown" in install and "/data" in install
    ins_words = [w for w, _ in stage]
    assert ins_words.index("USER") < ins_words.index("ENTRYPOINT")
    assert ins_words.index("RUN") < ins_words.index("VOLUME")


def healthcheck_command() -> list[str]:
    (hc,) = [a for w, a in final_stage() if w == "HEALTHCHECK"]
    return exec_form(hc.split(" CMD ", 1)[1].strip())


def copied_sources() -> list[str]:
    """What the Dockerfile's build stage COPYs from the context."""
    names = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            names += shlex.split(args)[:-1]
    return names


def test_dockerignore_keeps_what_the_build_copies():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for pattern in ("**/.venv", "**/.git", "**/__pycache__", "mq9-data"):
        assert pattern in ignore, pattern
    for src in copied_sources():
        assert (ROOT / src).exists(), src
        assert src not in ignore and src.rstrip("/") not in ignore, src


# ---- the entrypoint's command from a clean install ---------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def clean_node(tmp_path_factory):
    """A wheel of what the Dockerfile copies, in a fresh venv, running `mq9 node`."""
    tmp = tmp_path_factory.mktemp("clean-install")
    src = tmp / "src"
    src.mkdir()
    for name in copied_sources():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(tmp / "wheels"), str(src)],
                   check=True, timeout=120)
    (wheel,) = (tmp / "wheels").glob("mq9-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=60)
    python = venv / "bin" / "python"
    # Dependencies from the configured index (PyPI or a local mirror); none from this repo.
    subprocess.run(pip + ["--python", str(python), "install", str(wheel)], check=True,
                   timeout=180)
    mq9 = venv / "bin" / "mq9"
    assert mq9.exists()

    port, metrics = free_port(), free_port()
    log = (tmp / "node.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQ9_", "PYTHON"))}
    proc = subprocess.Popen(
        [str(mq9), "node", "--data-dir", str(tmp / "data"), "--port", str(port),
         "--metrics-port", str(metrics), "--cluster-port", "0", "--gateways", "1"],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "node.log").read_text()
            try:
                if http_get(metrics, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("node not ready in 30 s:\n" + (tmp / "node.log").read_text())
        yield {"proc": proc, "port": port, "metrics": metrics, "python": python, "tmp": tmp,
               "wheel": wheel}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def test_clean_install_serves_healthz(clean_node):
    assert http_get(clean_node["metrics"], "/healthz") == (200, '{"status":"ok"}')
    status, body = http_get(clean_node["metrics"], "/metrics")
    assert status == 200 and "mq9_connections" in body
    # where it runs from: the fresh venv, not this repository
    out = subprocess.run([str(clean_node["python"]), "-c", "import mq9; print(mq9.__file__)"],
                         capture_output=True, text=True, check=True, cwd=clean_node["tmp"])
    assert out.stdout.startswith(str(clean_node["tmp"] / "venv"))


def test_dockerfile_healthcheck_command(clean_node, tmp_path):
    """The HEALTHCHECK's command from the fresh venv, the image's /data swapped for the node's."""
    probe = healthcheck_command()
    mq9 = str(Path(clean_node["python"]).parent / "mq9")

    def run(data_dir):
        args = [str(data_dir) if a == "/data" else a for a in probe[1:]]
        return subprocess.run([mq9] + args, env={"PATH": os.environ["PATH"]}, timeout=30,
                              capture_output=True, text=True)

    ok = run(clean_node["tmp"] / "data")
    assert ok.returncode == 0, ok.stderr
    bad = run(tmp_path)  # no node there: unhealthy, one line why
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_nats_client_connects(clean_node):
    import nats

    async def main():
        nc = await nats.connect(f"nats://127.0.0.1:{clean_node['port']}", connect_timeout=5,
                                allow_reconnect=False)
        try:
            resp = await nc.request("$mq9.AI.MAILBOX.CREATE",
                                    json.dumps({"type": "standard", "ttl": 60}).encode(),
                                    timeout=5)
            box = json.loads(resp.data)
            sub = await nc.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*")
            ack = await nc.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal", b'{"x": 1}',
                                   timeout=5)
            assert json.loads(ack.data)["mail_id"] == box["mail_id"]
            msg = await sub.next_msg(timeout=5)
            assert json.loads(msg.data) == {"x": 1}
        finally:
            await nc.close()

    asyncio.run(main())


def test_helm_test_script_against_a_node(clean_node):
    """The `helm test` pod's script, run as is against the clean-install node."""
    pod = one(render(), "Pod", f"{FULLNAME}-test-request-reply")
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["python", "-c"]
    env = {"PATH": os.environ["PATH"], "NATS_HOST": "127.0.0.1",
           "NATS_PORT": str(clean_node["port"])}
    out = subprocess.run([str(clean_node["python"]), "-c", c["args"][0]], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("request/reply ok: ")


def clean_mq9(clean_node, *args: str) -> subprocess.CompletedProcess:
    """``mq9 ARGS`` from the fresh venv (no extras installed), against the clean node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQ9_", "PYTHON", "NATS_"))}
    argv = [str(clean_node["tmp"] / "venv" / "bin" / "mq9"), *args]
    if args[0] != "--version":
        argv += ["--server", f"nats://127.0.0.1:{clean_node['port']}"]
    out = subprocess.run(argv, env=env, cwd=clean_node["tmp"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out.stderr)
    return out


def test_client_commands_from_clean_install(clean_node):
    """`pip install mq9` alone is enough for the client commands (they need nats-py)."""
    created = clean_mq9(clean_node, "mailbox", "create", "--ttl", "60")
    mail_id = re.search(r"mail_id\s+(\S+)", created.stdout).group(1)
    sent = clean_mq9(clean_node, "send", mail_id, "--ack", '{"task": "from a clean install"}')
    assert sent.stdout.startswith("Stored msg_id "), sent.stdout
    # the owner subscription replays what is stored, so sending first is not a race
    got = clean_mq9(clean_node, "sub", f"$mq9.AI.INBOX.{mail_id}.*", "--count", "1", "--raw")
    assert got.stdout.strip() == '{"task": "from a clean install"}'


def test_clean_install_metadata(clean_node):
    """The wheel's version is mq9.__version__ and it carries the license."""
    version = clean_mq9(clean_node, "--version").stdout.strip()
    out = subprocess.run(
        [str(clean_node["python"]), "-c",
         "import importlib.metadata as m, mq9; d = m.distribution('mq9'); "
         "print(d.version, mq9.__version__, d.metadata['License-Expression'], "
         "any(str(f).endswith('LICENSE') for f in d.files))"],
        capture_output=True, text=True, check=True, cwd=clean_node["tmp"])
    dist_version, module_version, license_, has_file = out.stdout.split()
    assert version == f"mq9 {module_version}" and dist_version == module_version
    assert (license_, has_file) == ("Apache-2.0", "True")


def test_wheel_holds_no_tests(clean_node):
    """The unit tests beside their modules stay in the repository: no ``*_test.py`` and no
    conftest in the wheel (so none in the image), while their modules, those of the linked
    cluster/ folder too, are all there."""
    names = zipfile.ZipFile(clean_node["wheel"]).namelist()
    tests = [n for n in names if n.endswith(("_test.py", "conftest.py")) or n.startswith("tests/")]
    assert tests == []
    modules = {n for n in names if n.endswith(".py")}
    for source in [*(ROOT / "mq9").rglob("*.py"), *(ROOT / "cluster").glob("*.py")]:
        rel = source.relative_to(ROOT).as_posix()
        name = "mq9/" + rel if rel.startswith("cluster/") else rel
        if not source.name.endswith(("_test.py", "conftest.py")) and "__pycache__" not in rel:
            assert name in modules, name


def test_cluster_code_installs_as_mq9_cluster(clean_node):
    """The cluster/ folder is part of mq9 (mq9.cluster), never a generic top-level
    ``cluster`` package that could clash with another distribution's."""
    out = subprocess.run(
        [str(clean_node["python"]), "-c",
         "import importlib.metadata as m, importlib.util as u, mq9.cluster.state as s; "
         "d = m.distribution('mq9'); "
         "print(sorted({str(f).split('/')[0] for f in d.files if str(f).endswith('.py')}), "
         "u.find_spec('cluster') is None, '/site-packages/mq9/cluster/' in s.__file__)"],
        capture_output=True, text=True, check=True, cwd=clean_node["tmp"])
    assert out.stdout.split() == ["['mq9']", "True", "True"]


def test_sigterm_stops_cleanly(clean_node):
    """What `docker stop` and the pod's termination do: SIGTERM, drain, exit 0."""
    proc = clean_node["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
