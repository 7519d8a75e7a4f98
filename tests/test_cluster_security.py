"""Traffic between nodes is authenticated: the cluster secret seals Raft and control traffic
(pysyncobj's password), CURVE guards the ZeroMQ data ports, nothing listens beyond what the
configuration asks for, and cluster mode without a secret is refused.

Real nodes on 127.0.0.1; the intruders are raw TCP and raw pyzmq sockets.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib

import pytest
import zmq

from loadtest.cluster_hop import free_port_block
from mq9 import curve, endpoints, wire
from tests.nodeproc import Node, child_env

SECRET = "security-test-secret-0123456789"
SHARDS, GATEWAYS = 2, 1


def listening(node: Node) -> dict[int, str]:
    """port -> local address (hex, as in /proc/net/tcp) of every TCP socket the node's
    processes (supervisor and children) listen on."""
    inodes = set()
    for pid in [node.pid, *node.pids()]:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                p = line.split()
                if p[3] == "0A" and p[9] in inodes:  # 0A = LISTEN
                    addr, _, port = p[1].rpartition(":")
                    out[int(port, 16)] = addr
    return out


def cli(*args: str, secret: str | None = SECRET, timeout: float = 30):
    env = child_env({"MQ9_CLUSTER_SECRET": secret} if secret else None)
    return subprocess.run([sys.executable, "-m", "mq9", "cluster", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """One node in cluster mode: Raft port, shard and gateway TCP ports all open."""
    node = Node(tmp_path_factory.mktemp("secure") / "s1", env={"MQ9_CLUSTER_SECRET": SECRET},
                cluster_port=free_port_block(1 + SHARDS + GATEWAYS), shards=SHARDS,
                gateways=GATEWAYS, node_id="s1", advertise="127.0.0.1", ready_timeout=60)
    node.start()
    yield node
    node.close()


def _status(node: Node) -> dict:
    out = cli("status", "--json", "--server", f"127.0.0.1:{node.flags['cluster_port']}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_plain_node_listens_only_on_client_and_metrics_ports(tmp_path):
    # cluster_port None: the default 6222 applies, but nothing asks for cluster mode
    node = Node(tmp_path, cluster_port=None).start()
    try:
        assert set(listening(node)) == {node.port, node.metrics_port}
        run_dir = os.path.join(node.data_dir, "run")
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    finally:
        node.close()


def test_cluster_mode_without_secret_is_refused(tmp_path):
    node = Node(tmp_path, cluster_port=free_port_block(4), advertise="127.0.0.1")
    node.start(wait=False)
    assert node.proc.wait(30) == 1
    assert "cluster_secret_missing" in node.log_tail()


def test_secret_settings(tmp_path):
    import argparse

    from mq9 import config

    def cfg(argv, environ=None):
        p = argparse.ArgumentParser()
        config.add_arguments(p)
        return config.from_args(p.parse_args(argv), environ or {})

    f = tmp_path / "secret"
    f.write_text("from-a-file-0123456789\n")
    assert cfg(["--cluster-secret-file", str(f)]).cluster_secret == "from-a-file-0123456789"
    toml = tmp_path / "mq9.toml"
    toml.write_text('cluster_secret = "from-toml-0123456789"\n')
    assert cfg(["--config", str(toml)]).cluster_secret == "from-toml-0123456789"
    assert cfg([], {"MQ9_CLUSTER_SECRET": "from-env-0123456789"}).cluster_secret == "from-env-0123456789"
    assert cfg([], {"MQ9_CLUSTER_SECRET": ""}).cluster_secret is None
    with pytest.raises(ValueError, match="once"):
        cfg(["--cluster-secret-file", str(f), "--cluster-secret", "x" * 20])
    with pytest.raises(ValueError, match="at least 16"):
        cfg(["--cluster-secret", "short"])
    with pytest.raises(ValueError, match="No such file"):
        cfg(["--cluster-secret-file", str(tmp_path / "missing")])


def test_short_secret_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mq9", "node", "--cluster-secret", "short"],
                         env=child_env(), capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2 and "at least 16 characters" in out.stderr


def test_cluster_ports_bind_only_the_configured_host(member):
    ports = listening(member)
    base = member.flags["cluster_port"]
    assert set(ports) == {member.port, member.metrics_port, base,
                          *(endpoints.shard_tcp_port(base, i) for i in range(SHARDS)),
                          *(endpoints.gateway_tcp_port(base, SHARDS, j) for j in range(GATEWAYS))}
    assert set(ports.values()) == {"0100007F"}  # 127.0.0.1, the --host given


def test_malicious_pickle_on_the_raft_port_is_not_unpickled(member, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payloads = [Evil(), [Evil()], ["mq9", "status", Evil()]]  # a peer hello, utility messages
    for obj in payloads:
        data = zlib.compress(pickle.dumps(obj), 3)
        with socket.create_connection(("127.0.0.1", member.flags["cluster_port"]), timeout=5) as s:
            s.sendall(struct.pack("i", len(data)) + data)
            s.settimeout(5)
            try:
                assert s.recv(4096) == b""  # dropped without an answer
            except ConnectionResetError:
                pass
    time.sleep(0.3)
    assert not marker.exists()
    st = _status(member)  # the group still answers and still writes
    assert st["leader"] == "s1" and st["has_quorum"]
    out = cli("status", "--server", f"127.0.0.1:{member.flags['cluster_port']}")
    assert out.returncode == 0 and "s1" in out.stdout


def _ask_shard(endpoint: str, secret: str | None, wait: float) -> list | None:
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if secret is not None:
            curve.client(s, secret)
        s.connect(endpoint)
        s.send(wire.encode([wire.Query(rid=7, mail_id="m-nobody", token_hash=b"x" * 32)]))
        if s.poll(int(wait * 1000)):
            return wire.decode_from_shard(s.recv())
        return None
    finally:
        ctx.destroy(linger=0)


def test_shard_port_ignores_peers_without_the_key(member):
    ep = endpoints.shard_tcp("127.0.0.1", member.flags["cluster_port"], 0)
    assert _ask_shard(ep, None, 1.0) is None  # plain ZeroMQ: the handshake never completes
    assert _ask_shard(ep, "another-secret-0123456789", 1.0) is None  # CURVE, wrong key
    reply = _ask_shard(ep, SECRET, 10.0)  # a member's key: served
    assert reply and reply[0].rid == 7 and reply[0].code


def _mesh_handshake(endpoint: str, secret: str | None, wait: float,
                    own_keys: tuple[bytes, bytes] | None = None) -> str:
    """Dial a gateway's mesh port with a PUSH, as another node's gateway would; what the
    handshake came to: "ok", "refused" (ZAP said no) or "none" (never completed)."""
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if secret is not None:
            curve.client(s, secret)
        if own_keys is not None:  # knows the server's key, presents its own keypair
            s.setsockopt(zmq.CURVE_PUBLICKEY, own_keys[0])
            s.setsockopt(zmq.CURVE_SECRETKEY, own_keys[1])
        s.connect(endpoint)
        if not mon.poll(int(wait * 1000)):
            return "none"
        event = recv_monitor_message(mon)["event"]
        return "ok" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"
    finally:
        ctx.destroy(linger=0)


def test_gateway_mesh_port_admits_only_the_cluster_key(member):
    ep = endpoints.gateway_tcp("127.0.0.1", member.flags["cluster_port"], SHARDS, 0)
    assert _mesh_handshake(ep, None, 1.0) == "none"  # plain ZeroMQ meets a CURVE server
    assert _mesh_handshake(ep, "another-secret-0123456789", 5.0) != "ok"
    # Knowing the server's public key is not enough: the ZAP check wants the cluster's key.
    assert _mesh_handshake(ep, SECRET, 5.0, own_keys=zmq.curve_keypair()) == "refused"
    assert _mesh_handshake(ep, SECRET, 5.0) == "ok"


def test_control_channel_refuses_a_missing_or_wrong_secret(member):
    server = f"127.0.0.1:{member.flags['cluster_port']}"
    out = cli("status", "--server", server, secret=None)
    assert out.returncode == 1 and "cluster secret is needed" in out.stderr
    t0 = time.monotonic()
    out = cli("remove", "s1", "--force", "--server", server, secret="wrong-secret-0123456789")
    assert out.returncode == 1 and "wrong or missing cluster secret" in out.stderr, out.stderr
    assert time.monotonic() - t0 < 15
    assert list(_status(member)["members"]) == ["s1"]


def test_join_with_a_wrong_secret_fails_clearly(member, tmp_path):
    intruder = Node(tmp_path, env={"MQ9_CLUSTER_SECRET": "wrong-secret-0123456789"},
                    cluster_port=free_port_block(4), shards=SHARDS, gateways=GATEWAYS,
                    node_id="x1", advertise="127.0.0.1",
                    join=f"127.0.0.1:{member.flags['cluster_port']}")
    intruder.start(wait=False)
    assert intruder.proc.wait(30) == 1
    assert "wrong or missing cluster secret" in intruder.log_tail()
    assert list(_status(member)["members"]) == ["s1"]
