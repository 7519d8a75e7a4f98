"""Who is in the cluster, as clients and restarts see it: a removed node stays out when it
is restarted the way a StatefulSet restarts it (same flags, same data dir) until it is
started with --rejoin; INFO connect_urls lists the members' client URLs, so a client given
one URL fails over to the others.

Real nodes on 127.0.0.1 (test_cluster's helpers), real nats-py clients.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import nats
from agents import echo_responder
from nodeproc import child_env
from test_cluster import SECRET_ENV, cluster_node, cluster_status, wait_balanced, wait_members


def _remove(via_port: int, node_id: str) -> None:
    out = subprocess.run([sys.executable, "-m", "mq9", "cluster", "remove", node_id,
                          "--server", f"127.0.0.1:{via_port}", "--timeout", "120"],
                         capture_output=True, text=True, timeout=150, env=child_env(SECRET_ENV))
    assert out.returncode == 0, out.stdout + out.stderr


def test_removed_node_stays_out_until_started_with_rejoin(tmp_path):
    n1 = cluster_node(tmp_path, "s1").start()
    n2 = cluster_node(tmp_path, "s2", join=n1.flags["cluster_port"]).start()
    n3 = cluster_node(tmp_path, "s3", join=n2.flags["cluster_port"]).start()
    nodes = [n1, n2, n3]
    port = n1.flags["cluster_port"]
    try:
        wait_members(port, 3)
        wait_balanced(port, 3)
        _remove(port, "s3")
        assert n3.proc.wait(timeout=30) == 0  # it stops by itself; the kubelet restarts it

        # The restart a StatefulSet does: exactly the same flags, --join included.
        n3.start(wait=False)
        deadline = time.monotonic() + 30
        while "cluster_removed_staying_out" not in n3.log_text():
            assert n3.running, n3.log_tail()
            assert time.monotonic() < deadline, n3.log_tail()
            time.sleep(0.2)
        status, body = n3.http_get("/readyz")
        assert status == 503 and "--rejoin" in body, (status, body)
        assert n3.http_get("/healthz")[0] == 200  # a liveness probe leaves it alone
        health = subprocess.run([sys.executable, "-m", "mq9", "health", "--data-dir",
                                 n3.data_dir], capture_output=True, text=True, timeout=30,
                                env=child_env())
        assert health.returncode == 0, health.stdout + health.stderr  # the image's HEALTHCHECK
        time.sleep(3)  # long enough for a join and the first slot moves, had it joined
        assert n3.running and n3.pids() == []  # idle: no gateway, no shard
        st = cluster_status(port)
        assert sorted(st["members"]) == ["s1", "s2"], st["members"]
        assert len(st["raft_members"]) == 2, st["raft_members"]
        assert set(st["slots_per_node"]) == {"s1", "s2"} and not st["moves_total"], st
        assert n3.stop() == 0  # SIGTERM while idle: a clean exit, no crash loop

        n3.flags["rejoin"] = True
        n3.start()
        st = wait_members(port, 3, timeout=60)
        assert sorted(st["members"]) == ["s1", "s2", "s3"], st["members"]
        st = wait_balanced(port, 3, timeout=90)
        assert st["slots_per_node"]["s3"] > 0, st["slots_per_node"]
        # A member again: its next ordinary restart is a restart, not a removal.
        assert n3.stop() == 0
        n3.flags["rejoin"] = None
        n3.start()
        assert "cluster_removed_staying_out" not in n3.log_text().rpartition("--- start")[2]
        assert sorted(cluster_status(port)["members"]) == ["s1", "s2", "s3"]
    finally:
        for n in reversed(nodes):
            n.close()


async def test_connect_urls_let_a_client_fail_over(tmp_path):
    n1 = cluster_node(tmp_path, "u1").start()
    n2 = cluster_node(tmp_path, "u2", join=n1.flags["cluster_port"]).start()
    nodes = [n1, n2]
    ncs = []
    try:
        await asyncio.to_thread(wait_members, n1.flags["cluster_port"], 2)
        # Default reconnect settings, one URL: the others come from INFO connect_urls.
        reconnected = asyncio.Event()

        async def on_reconnect():
            reconnected.set()

        client = await nats.connect(n1.url, reconnected_cb=on_reconnect)
        ncs.append(client)
        assert {u.netloc for u in client.discovered_servers} == {f"127.0.0.1:{n2.port}"}

        # A member that joins later is announced by an asynchronous INFO.
        n3 = cluster_node(tmp_path, "u3", join=n2.flags["cluster_port"])
        nodes.append(n3)
        await asyncio.to_thread(n3.start)
        deadline = time.monotonic() + 20
        while f"127.0.0.1:{n3.port}" not in {u.netloc for u in client.discovered_servers}:
            assert time.monotonic() < deadline, client.discovered_servers
            await asyncio.sleep(0.1)
        await asyncio.to_thread(wait_balanced, n1.flags["cluster_port"], 3)

        ncs.append(await echo_responder(n3.url, "svc.echo"))
        assert (await client.request("svc.echo", b"a", timeout=5)).data == b"re:a"

        t0 = time.monotonic()
        n1.kill()  # kill -9 of the supervisor; its children follow
        await asyncio.wait_for(reconnected.wait(), 60)
        print(f"\nkill -9 of the client's node: reconnected to {client.connected_url.netloc} "
              f"after {time.monotonic() - t0:.2f}s")
        assert client.connected_url.netloc in (f"127.0.0.1:{n2.port}", f"127.0.0.1:{n3.port}")
        deadline = time.monotonic() + 10
        while True:  # the first request may meet the mesh still waiting on the dead node
            try:
                r = await client.request("svc.echo", b"b", timeout=3)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                assert time.monotonic() < deadline
        assert r.data == b"re:b"
    finally:
        for nc in ncs:
            if not nc.is_closed:
                await nc.close()
        for n in reversed(nodes):
            n.close()


def test_connect_urls_of_a_lone_member_and_no_advertise(tmp_path):
    from natsraw import RawConn

    for no_advertise in (False, True):
        n = cluster_node(tmp_path / str(no_advertise), "a1")
        n.flags["no_advertise"] = no_advertise
        with n.start(), RawConn(n.port) as conn:
            info = conn.info
        if no_advertise:
            assert "connect_urls" not in info, info
        else:
            assert info["connect_urls"] == [f"127.0.0.1:{n.port}"], info
