"""The monitoring port beside nats-server's: /varz names, types and units, /healthz and
/readyz bodies, one server_id per node, the NATS version in INFO; /metrics from the first
scrape (node-wide process metrics, build info, counters at 0); ``mq9 health``."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nats
import pytest
from natsraw import free_port, start_nats_server
from nodeproc import REPO, child_env

import mq9
from mq9.protocol import NATS_VERSION

# /varz fields mq9 must have under nats-server's names (mq9's own come on top).
VARZ_SHARED = ("server_id", "server_name", "version", "proto", "host", "port", "max_connections",
               "ping_interval", "ping_max", "http_host", "http_port", "auth_timeout",
               "max_control_line", "max_payload", "max_pending", "cluster", "tls_timeout",
               "start", "now", "uptime", "mem", "cores", "cpu", "connections",
               "total_connections", "in_msgs", "in_bytes", "in_client_msgs", "in_client_bytes",
               "out_msgs", "out_bytes", "out_client_msgs", "out_client_bytes", "slow_consumers",
               "subscriptions")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def kind(v) -> str:
    """A JSON value's type as a client decoding it sees it (Go marshals 2.0 as 2)."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


@pytest.fixture(scope="module")
def nats_server():
    http = free_port()
    server = start_nats_server(extra=f'http: "127.0.0.1:{http}"')
    server.http = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 10
    while True:
        try:
            get(server.http + "/healthz")
            break
        except OSError:
            assert time.monotonic() < deadline, "nats-server's monitoring port never answered"
            time.sleep(0.05)
    yield server
    server.stop()


def test_varz_names_types_and_units_match_nats_server(shared_node, nats_server):
    ns = json.loads(get(nats_server.http + "/varz")[2])
    status, ctype, body = get(shared_node.metrics_url + "/varz")
    assert status == 200 and ctype == "application/json"
    varz = json.loads(body)
    missing = [k for k in VARZ_SHARED if k not in varz]
    assert not missing, missing
    assert all(k in ns for k in VARZ_SHARED), [k for k in VARZ_SHARED if k not in ns]
    wrong = {k: (kind(varz[k]), kind(ns[k])) for k in varz if k in ns and kind(varz[k]) != kind(ns[k])}
    assert not wrong, wrong  # every field nats-server also has: the same JSON type
    # the same units: nanoseconds, bytes, percent, nats-server's uptime spelling
    assert varz["ping_interval"] == ns["ping_interval"] == 120 * 10**9
    assert isinstance(varz["mem"], int) and varz["mem"] > 20 * 2**20  # several Python processes
    assert 0 <= varz["cpu"] <= 100 * varz["cores"]
    assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?\d+s", varz["uptime"]), varz["uptime"]
    assert varz["version"] == NATS_VERSION and varz["mq9_version"] == mq9.__version__
    assert varz["cluster"] == {} and varz["http_port"] == shared_node.metrics_port


def test_health_bodies_match_nats_server(shared_node, nats_server):
    ours = get(shared_node.metrics_url + "/healthz")
    theirs = get(nats_server.http + "/healthz")
    assert ours[0] == theirs[0] == 200
    assert ours[1] == theirs[1] == "application/json"
    assert json.loads(ours[2]) == json.loads(theirs[2]) == {"status": "ok"}
    assert get(shared_node.metrics_url + "/readyz")[:3] == (200, "application/json", '{"status":"ok"}')


async def test_one_server_id_per_node_and_a_2x_version(shared_node):
    varz = json.loads(shared_node.http_get("/varz")[1])
    ids = set()
    for _ in range(8):  # spread over the gateways by the kernel
        nc = await nats.connect(shared_node.url, allow_reconnect=False, connect_timeout=5)
        try:
            assert nc.connected_server_version.major == 2
            assert nc._server_info["version"] == NATS_VERSION
            assert nc._server_info["mq9_version"] == mq9.__version__
            ids.add(nc._server_info["server_id"])
        finally:
            await nc.close()
    assert ids == {varz["server_id"]}
    # and every gateway holds that one id, whichever a client reaches
    deadline = time.monotonic() + 10
    while len(stats := glob.glob(os.path.join(shared_node.data_dir, "run", "stats-gw-*.json"))) < 2:
        assert time.monotonic() < deadline, stats  # written once a second
        time.sleep(0.1)
    for path in stats:
        with open(path) as f:
            assert json.load(f)["server_id"] == varz["server_id"], path


def test_metrics_from_the_first_scrape(node):
    text = node.metrics()  # the first scrape of this node

    def value(sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert m, f"{sample} missing from the first scrape"
        return float(m.group(1))

    own_rss = int(open(f"/proc/{node.pid}/stat").read().rpartition(")")[2].split()[21]) \
        * os.sysconf("SC_PAGE_SIZE")
    assert value("process_resident_memory_bytes") > own_rss  # the children's, summed
    assert value("process_open_fds") > 20
    assert value("process_cpu_seconds_total") > 0
    assert abs(value("process_start_time_seconds") - time.time()) < 600
    assert value(f'mq9_build_info{{nats_version="{NATS_VERSION}",python="{sys.version.split()[0]}",'
                 f'version="{mq9.__version__}"}}') == 1
    for kind in ("gateway", "shard"):
        assert value(f'mq9_process_restarts_total{{kind="{kind}"}}') == 0
    for kind in ("credentials", "no_connect", "tls"):
        assert value(f'mq9_auth_failures_total{{kind="{kind}"}}') == 0
    assert value('mq9_drops_total{reason="slow_consumer"}') == 0
    assert value('mq9_messages_in_total{kind="mailbox"}') == 0
    assert value("mq9_slots_unavailable") == 0


def _poll_while_down(node, kind: str, index: int, see):
    """Kill ``kind-index`` until ``see()`` returns something during its restart delay
    (which doubles with each quick death: 0.2 s, 0.4 s, 0.8 s, ...)."""
    for _ in range(6):
        pid = node.pid_of(kind, index)
        if pid is None:
            time.sleep(0.05)
            continue
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = see()
            if got:
                return got
            if node.pid_of(kind, index) not in (None, pid):
                break  # restarted before we looked: kill again, the next delay is longer
            time.sleep(0.01)
    raise AssertionError(f"never saw {kind}-{index} down\n" + node.log_tail())


def test_health_503_and_slots_unavailable_while_a_shard_is_down(node):
    def see():
        status, body = node.http_get("/healthz")
        if status != 503:
            return None
        return body, node.metric("mq9_slots_unavailable"), node.http_get("/readyz")

    body, slots, readyz = _poll_while_down(node, "shard", 1, see)
    doc = json.loads(body)
    assert set(doc) == {"status", "error"} and doc["status"] == "unavailable", doc
    assert "shard-1 is not running" in doc["error"], doc
    assert slots in (2048, 0)  # half of 4096 slots with 2 shards (0 if it came back between)
    assert readyz[0] == 503 and json.loads(readyz[1])["status"] == "unavailable"
    node.wait_ready(timeout=30)
    assert node.metric("mq9_slots_unavailable") == 0
    assert node.metric('mq9_process_restarts_total{kind="shard"}') >= 1


def health(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mq9", "health", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=30)


@pytest.mark.parametrize("metrics_port", ["other", 0])
def test_mq9_health_follows_the_node_s_ports(node_factory, metrics_port):
    """A non-default --metrics-port (what `docker run mq9 --metrics-port 9191` does), and the
    metrics port off, where the NATS port must send INFO."""
    flags = {"metrics_port": free_port()} if metrics_port == "other" else {"metrics_port": 0}
    node = node_factory(**flags)
    ok = health(node.data_dir)
    assert ok.returncode == 0, ok.stderr
    assert ("/healthz" if metrics_port else "sent INFO") in ok.stdout
    node.stop()
    down = health(node.data_dir)
    assert down.returncode == 1
    (line,) = down.stderr.strip().splitlines()
    assert "unhealthy" in line and "not running" in line, line
    (line,) = health(os.path.join(node.dir, "nowhere")).stderr.strip().splitlines()
    assert "no node has started" in line


def test_cluster_member_varz_and_slots_unavailable(tmp_path):
    """In cluster mode the slots come from the metadata group: a member that owns all 4096
    (the first one) misses half of them while one of its two shards is down."""
    from nodeproc import Node

    from loadtest.cluster_hop import free_port_block

    cport = free_port_block(1 + 2 + 2)
    node = Node(tmp_path / "n1", env={"MQ9_CLUSTER_SECRET": "test-cluster-secret-0123456789"},
                cluster_port=cport, node_id="n1", advertise="127.0.0.1", ready_timeout=60)
    try:
        node.start()
        varz = json.loads(node.http_get("/varz")[1])
        assert varz["cluster"] == {"addr": "127.0.0.1", "cluster_port": cport, "name": "n1"}
        assert node.metric("mq9_slots_unavailable") == 0

        def see():
            n = node.metric("mq9_slots_unavailable")
            return n if n else None

        assert _poll_while_down(node, "shard", 0, see) == 2048
    finally:
        node.close()
