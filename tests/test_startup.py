"""Start-up and restart as clients see them: the metrics port answers only once clients can
connect, a stock nats-py client rides out ``kill -9`` of the whole node, ``--gateways 0``
counts the CPUs the node may use, and a Kubernetes service link in ``MQ9_PORT`` is named."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import nats
import pytest
from nodeproc import REPO, child_env


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _info(host: str, port: int) -> dict:
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, "closed before INFO"
            data += chunk
    assert data.startswith(b"INFO "), data
    return json.loads(data[5:data.index(b"\r\n")])


@pytest.mark.parametrize("attempt", range(3))
async def test_metrics_port_answers_only_once_clients_can_connect(node_factory, attempt):
    node = node_factory(start=False)
    node.start(wait=False)
    deadline = time.monotonic() + 60
    while not _accepts(node.host, node.metrics_port):
        assert node.running, node.log_tail()
        assert time.monotonic() < deadline, "metrics port never answered\n" + node.log_tail()
        time.sleep(0.005)
    # The first moment anything says the node is up: every gateway takes clients now. Many
    # raw connections, so that the kernel's SO_REUSEPORT spread reaches each gateway.
    for _ in range(10):
        assert _info(node.host, node.port)["server_id"]
    nc = await nats.connect(node.url, allow_reconnect=False, connect_timeout=2)
    await nc.close()
    assert node.http_get("/readyz") == (200, '{"status":"ok"}')
    assert node.http_get("/healthz") == (200, '{"status":"ok"}')


async def test_stock_client_reconnects_after_kill_9_and_restart(node):
    """nats-py with its default reconnect settings, the whole node killed with SIGKILL and
    started again on the same data dir and ports."""
    reconnected = asyncio.Event()

    async def on_reconnect():
        reconnected.set()

    nc = await nats.connect(node.url, reconnected_cb=on_reconnect)  # defaults otherwise
    other = None
    try:
        plain = await nc.subscribe("restart.plain")
        box = json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE",
                                           b'{"type":"standard","ttl":600}', timeout=5)).data)
        inbox = await nc.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*")
        await nc.flush()

        children = node.pids()
        node.kill()
        assert node.wait_gone(children, timeout=5) == [], node.log_tail()
        node.start()
        await asyncio.wait_for(reconnected.wait(), 60)
        await nc.flush()

        other = await nats.connect(node.url, allow_reconnect=False, connect_timeout=5)
        await other.publish("restart.plain", b"after")
        await other.flush()
        ack = json.loads((await other.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal",
                                              b"stored", timeout=5)).data)
        assert ack["mail_id"] == box["mail_id"], ack
        assert (await plain.next_msg(timeout=10)).data == b"after"
        assert (await inbox.next_msg(timeout=10)).data == b"stored"
    finally:
        if other is not None:
            await other.close()
        await nc.close()


# Started with an affinity of one CPU (the child inherits it), on a host with more or not.
ONE_CPU = [sys.executable, "-c",
           "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
           "from mq9.cli import main; sys.exit(main(['node'] + sys.argv[1:]))"]


def test_gateways_0_counts_the_cpus_the_node_may_use(node_factory):
    node = node_factory(command=ONE_CPU, gateways=0)
    assert len(node.pids("gateway")) == 1, node.children()
    varz = json.loads(node.http_get("/varz")[1])
    assert varz["gateways"] == 1 and varz["cores"] == 1, varz


def test_kubernetes_service_link_in_mq9_port_is_named():
    r = subprocess.run([sys.executable, "-m", "mq9", "node"], capture_output=True, text=True,
                       env=child_env({"MQ9_PORT": "tcp://10.0.0.1:4222"}), cwd=REPO, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("mq9 node: error: MQ9_PORT=tcp://10.0.0.1:4222 "), line
    assert "Kubernetes service link" in line and "enableServiceLinks: false" in line, line
