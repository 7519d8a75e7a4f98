"""Lame-duck mode (SIGUSR2 to the supervisor, as nats-server's `--signal ldm`): the node stops
accepting, tells its clients (INFO "ldm"), closes them gradually over lame_duck_duration after
lame_duck_grace_period, then stops with exit status 0. In a cluster its clients reconnect to
the other nodes, which INFO connect_urls told them about.

Real nodes and real clients: raw sockets to see the INFO lines, nats-py for failover.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import nats
from agents import echo_responder
from natsraw import RawConn
from nodeproc import child_env
from test_cluster import cluster_node, cluster_status, wait_balanced, wait_members

CLIENTS = 30
GRACE, DURATION = 1.0, 5.0


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_lame_duck_stops_accepting_tells_clients_and_closes_them_gradually(node_factory):
    node = node_factory(lame_duck_grace_period=GRACE, lame_duck_duration=DURATION)
    conns = [RawConn(node.port) for _ in range(CLIENTS)]
    try:
        for c in conns:
            c.handshake()
        signalled = time.monotonic()
        # What the Helm chart's preStop hook runs: SIGUSR2 to the pid in supervisor.lock.
        out = subprocess.run([sys.executable, "-m", "mq9", "node", "--signal", "ldm",
                              "--data-dir", node.data_dir], capture_output=True, text=True,
                             timeout=30, env=child_env())
        assert out.returncode == 0, out.stdout + out.stderr

        deadline = time.monotonic() + 10
        while not _refused(node.host, node.port):
            assert time.monotonic() < deadline, "still accepting connections in lame-duck mode"
            time.sleep(0.1)
        status, body = node.http_get("/readyz")
        assert status == 503 and "lame duck" in body, (status, body)
        assert node.http_get("/healthz")[0] == 200  # alive: no liveness restart meanwhile

        ldm_info: dict[int, dict] = {}
        closed_at: dict[int, float] = {}
        deadline = time.monotonic() + GRACE + DURATION + 20
        while len(closed_at) < CLIENTS and time.monotonic() < deadline:
            for i, c in enumerate(conns):
                if i in closed_at:
                    continue
                c.check_closed(wait_ms=0)
                for line in c.buf.split(b"\r\n"):
                    if line.startswith(b"INFO ") and b'"ldm":true' in line:
                        ldm_info[i] = json.loads(line[5:])
                if c.closed:
                    closed_at[i] = time.monotonic() - signalled
            time.sleep(0.01)
        assert len(closed_at) == CLIENTS, f"{CLIENTS - len(closed_at)} clients never closed"
        assert sorted(ldm_info) == list(range(CLIENTS)), "some clients got no INFO with ldm"
        assert all(info["ldm"] is True for info in ldm_info.values())

        times = sorted(closed_at.values())
        print(f"\nlame duck, {CLIENTS} clients, grace {GRACE}s, duration {DURATION}s: closed "
              f"from {times[0]:.2f}s to {times[-1]:.2f}s after SIGUSR2")
        # None before the grace period, and spread out rather than all at once (loosely:
        # the machine is shared, so only the shape is checked, not the pace).
        assert times[0] >= GRACE * 0.8, times
        assert times[-1] - times[0] >= 1.0, times
        busiest = max(sum(1 for t in times if s <= t < s + 0.1) for s in times)
        assert busiest <= CLIENTS // 2, times
        assert node.proc.wait(timeout=30) == 0
        assert "node_lame_duck" in node.log_text() and "node_stopped" in node.log_text()
    finally:
        for c in conns:
            c.close()


def _urls_in_infos(data: bytes) -> list[list[str]]:
    """connect_urls of each INFO line in ``data`` (asynchronous INFOs), in order."""
    return [json.loads(line[5:]).get("connect_urls", [])
            for line in data.split(b"\r\n") if line.startswith(b"INFO ")]


def _wait_info(conn: RawConn, predicate, timeout: float = 15.0) -> dict:
    """The first INFO line on ``conn`` whose document satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = conn.read_until(b"\r\n", timeout=max(0.1, deadline - time.monotonic()))
        if line.startswith(b"INFO "):
            info = json.loads(line[5:])
            if predicate(info):
                return info
        elif conn.closed and not conn.buf:
            break
    raise AssertionError(f"no such INFO within {timeout}s (closed={conn.closed})")


async def test_lame_duck_in_a_cluster_moves_clients_to_the_other_nodes(tmp_path):
    n1 = cluster_node(tmp_path, "l1").start()
    n2 = cluster_node(tmp_path, "l2", join=n1.flags["cluster_port"])
    n2.flags.update(lame_duck_grace_period=GRACE, lame_duck_duration=DURATION)
    n2.start()
    n3 = cluster_node(tmp_path, "l3", join=n1.flags["cluster_port"]).start()
    nodes = [n1, n2, n3]
    url = {n: f"127.0.0.1:{n.port}" for n in nodes}
    ncs = []
    try:
        await asyncio.to_thread(wait_members, n1.flags["cluster_port"], 3)
        await asyncio.to_thread(wait_balanced, n1.flags["cluster_port"], 3)
        await asyncio.sleep(0.6)
        watch1 = RawConn(n1.port)
        watch1.handshake()
        duck = RawConn(n2.port)
        duck.handshake()
        assert sorted(duck.info["connect_urls"]) == sorted(url.values())

        ncs.append(await echo_responder(n3.url, "svc.echo"))
        reconnected = asyncio.Event()

        async def on_reconnect():
            reconnected.set()

        # Default reconnect settings; only n2's URL given, the rest learned from INFO.
        client = await nats.connect(n2.url, reconnected_cb=on_reconnect)
        ncs.append(client)
        assert {u.netloc for u in client.discovered_servers} == {url[n1], url[n3]}
        assert (await client.request("svc.echo", b"a", timeout=5)).data == b"re:a"

        t0 = time.monotonic()
        n2.signal(signal.SIGUSR2)
        ldm = await asyncio.to_thread(_wait_info, duck, lambda i: i.get("ldm"))
        assert sorted(ldm["connect_urls"]) == sorted([url[n1], url[n3]])
        # The other members stop advertising the lame duck too (through the metadata).
        info = await asyncio.to_thread(_wait_info, watch1, lambda i: url[n2] not in i["connect_urls"])
        assert sorted(info["connect_urls"]) == sorted([url[n1], url[n3]])
        st = await asyncio.to_thread(cluster_status, n1.flags["cluster_port"])
        assert st["members"]["l2"].get("lame_duck") is True, st["members"]["l2"]

        await asyncio.wait_for(reconnected.wait(), GRACE + DURATION + 30)
        print(f"\nlame duck in a cluster: the client reconnected to "
              f"{client.connected_url.netloc} {time.monotonic() - t0:.2f}s after SIGUSR2")
        assert client.connected_url.netloc in (url[n1], url[n3])
        assert (await client.request("svc.echo", b"b", timeout=5)).data == b"re:b"
        assert await asyncio.to_thread(n2.proc.wait, 30) == 0

        # Back from the restart, it is advertised again.
        await asyncio.to_thread(n2.start)
        info = await asyncio.to_thread(_wait_info, watch1, lambda i: url[n2] in i["connect_urls"])
        assert sorted(info["connect_urls"]) == sorted(url.values())
        watch1.close()
        duck.close()
    finally:
        for nc in ncs:
            if not nc.is_closed:
                await nc.close()
        for n in reversed(nodes):
            n.close()
