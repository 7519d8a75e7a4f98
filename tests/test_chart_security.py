"""The chart's TLS and auth values against a real node (issue 10, item 5).

There is no Kubernetes here, so the pod is played by hand: the Secrets' files are written
where the pod spec mounts them (under a temporary root standing for the container's /), a
real ``mq9 node`` is started with the MQ9_* variables the rendered container gets, and the
``helm test`` pod's script runs, as rendered, with its rendered environment. It must get
its request/reply through TLS with a client certificate and a user of the auth file, and
must be refused without either.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import certs  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from nodeproc import Node  # noqa: E402
from test_packaging import FULLNAME, container, one, render, statefulset  # noqa: E402

VALUES = {"tls": {"enabled": True, "secretName": "mq9-tls", "caKey": "ca.crt", "verify": True},
          "auth": {"enabled": True, "secretName": "mq9-auth", "key": "users.json"},
          "tests": {"credentialsSecret": "mq9-test-user"}}
USER, PASSWORD = "helm-test", "helm-test-password"


def tls_secret(ca: certs.CA, directory: Path) -> None:
    """What a cert-manager Certificate's Secret holds: tls.crt, tls.key, ca.crt. With
    tls.verify the `helm test` pod presents this same certificate as its client
    certificate, so it is issued for both server and client authentication."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, FULLNAME)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca.key, hashes.SHA256()))
    directory.mkdir(parents=True)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (directory / "ca.crt").write_bytes(Path(ca.pem).read_bytes())


def mounted(root: Path, value: str) -> str:
    """A path inside the pod, as it is on this machine."""
    return f"{root}{value}" if value.startswith("/etc/mq9/") else value


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """The rendered pod's Secrets in place and a node started with its settings."""
    tmp = tmp_path_factory.mktemp("chart-security")
    rendered = render(VALUES)
    spec = statefulset(rendered)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(rendered)["volumeMounts"]}
    secrets = {v["secret"]["secretName"]: mounts[v["name"]] for v in spec["volumes"]
               if "secret" in v}
    root = tmp / "root"
    tls_secret(certs.CA(tmp / "ca"), Path(f"{root}{secrets['mq9-tls']}"))
    users = Path(f"{root}{secrets['mq9-auth']}")
    users.mkdir(parents=True)
    (users / "users.json").write_text(json.dumps({"users": [
        {"user": USER, "password": PASSWORD,
         "permissions": {"publish": ["$mq9.AI.MAILBOX.CREATE"], "subscribe": ["_INBOX.>"]}}]}))

    # the container's own settings (MQ9_CLUSTER_SECRET aside: this node runs alone)
    env = {e["name"]: mounted(root, e["value"]) for e in container(rendered)["env"]
           if e["name"].startswith("MQ9_") and "value" in e}
    node = Node(tmp / "node", env=env, gateways=1)
    try:
        node.start()
        yield rendered, root, node
    finally:
        node.close()


def helm_test(rendered, root: Path, node: Node, drop: tuple[str, ...] = ()):
    """The `helm test` pod's script, run as rendered, its Secrets and Service played here."""
    test_pod = one(rendered, "Pod", f"{FULLNAME}-test-request-reply")
    (c,) = test_pod["spec"]["containers"]
    env = {"PATH": "/usr/bin:/bin"}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = mounted(root, e["value"])
        else:  # tests.credentialsSecret's keys
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "mq9-test-user"
            env[e["name"]] = {"user": USER, "password": PASSWORD}[ref["key"]]
    env.update(NATS_HOST="127.0.0.1", NATS_PORT=str(node.port))
    for name in drop:
        del env[name]
    assert c["command"] == ["python", "-c"]
    return subprocess.run([sys.executable, "-c", c["args"][0]], env=env, capture_output=True,
                          text=True, timeout=60)


def test_helm_test_passes_over_tls_with_a_user(pod):
    out = helm_test(*pod)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("request/reply ok: ")


def test_node_refuses_a_client_without_a_user(pod):
    out = helm_test(*pod, drop=("NATS_USER", "NATS_PASS"))
    assert out.returncode != 0
    assert "Authorization Violation" in out.stderr, out.stderr


def test_node_refuses_a_client_without_a_certificate(pod):
    out = helm_test(*pod, drop=("NATS_TLS_CERT", "NATS_TLS_KEY"))
    assert out.returncode != 0
    # TLS 1.3 reports the refused handshake at the client's next read or write: an alert
    # (certificate required) or the connection's end, depending on timing
    assert "ssl.SSL" in out.stderr, out.stderr


def test_node_refuses_a_client_without_tls(pod):
    out = helm_test(*pod, drop=("NATS_TLS", "NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"))
    assert out.returncode != 0
    assert "request/reply ok" not in out.stdout
