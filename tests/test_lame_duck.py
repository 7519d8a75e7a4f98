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
import time

import nats

from natsraw import RawConn
from test_cluster import cluster_node, wait_balanced, wait_members

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
        node.signal(signal.SIGUSR2)

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
