"""Several mq9 nodes acting as one broker: `mq9 node --join`, clients on any node.

Real nodes on 127.0.0.1, each with its own ports and data dir; real nats-py clients.
What is not built yet (slot moves to a joined node) is not tested here; see docs/CLUSTER.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import nats
import pytest

from loadtest.cluster_hop import free_port_block
from tests.nodeproc import Node, child_env

SHARDS, GATEWAYS = 2, 2
# Cluster mode needs one; given the way a deployment would (an env var, not argv).
SECRET = "test-cluster-secret-0123456789"
SECRET_ENV = {"MQ9_CLUSTER_SECRET": SECRET}


def cluster_node(tmp_path, name: str, join: int | None = None) -> Node:
    flags = dict(cluster_port=free_port_block(1 + SHARDS + GATEWAYS), shards=SHARDS,
                 gateways=GATEWAYS, node_id=name, advertise="127.0.0.1", ready_timeout=60)
    if join is not None:
        flags["join"] = f"127.0.0.1:{join}"
    return Node(tmp_path / name, env=SECRET_ENV, **flags)


def cluster_status(port: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "mq9", "cluster", "status", "--json",
                          "--server", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=30, env=child_env(SECRET_ENV))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_balanced(port: int, nodes: int, timeout: float = 60.0) -> dict:
    """Until every member owns its share of the slots and no move is in progress."""
    deadline = time.monotonic() + timeout
    while True:
        st = cluster_status(port)
        per = st["slots_per_node"]
        if (len(per) == nodes and not st["moves_total"]
                and max(per.values()) - min(per.values()) <= SHARDS):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"not balanced after {timeout}s: {per}, moves {st['moves_total']}")
        time.sleep(0.3)


def owner_of(node: Node, mail_id: str) -> str:
    """Which node owns ``mail_id``'s slot, from that node's copy of the metadata."""
    from mq9.cluster.slots import slot_of
    from mq9.cluster.state import read_snapshot

    snap = read_snapshot(str(node.dir / "data" / "cluster" / "state.json"))
    return snap.slots[slot_of(mail_id)][0]


def wait_members(port: int, n: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = cluster_status(port)
        if len(st["members"]) == n or time.monotonic() > deadline:
            return st
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    n1 = cluster_node(tmp, "n1").start()
    n2 = cluster_node(tmp, "n2", join=n1.flags["cluster_port"]).start()
    n3 = cluster_node(tmp, "n3", join=n2.flags["cluster_port"]).start()  # any member is a seed
    st = wait_members(n1.flags["cluster_port"], 3)
    assert len(st["members"]) == 3
    wait_balanced(n1.flags["cluster_port"], 3)
    time.sleep(0.6)  # gateways re-read the snapshot every 200 ms
    yield [n1, n2, n3]
    for n in (n3, n2, n1):
        n.close()


async def connect(node: Node):
    return await nats.connect(node.url, connect_timeout=5, max_reconnect_attempts=0)


async def settle(nc) -> None:
    """nats-py writes flush()'s PING straight to the socket, ahead of a SUB still in its
    buffer, so one flush does not prove the server has the SUB; the second PING is
    written after it."""
    await nc.flush()
    await nc.flush()


def test_join_makes_one_cluster(cluster):
    st = cluster_status(cluster[2].flags["cluster_port"])
    assert set(st["members"]) == {"n1", "n2", "n3"}
    assert st["leader"]
    # Slots moved until every node holds its share.
    per = st["slots_per_node"]
    assert sum(per.values()) == 4096
    assert max(per.values()) - min(per.values()) <= SHARDS, per


async def test_mailbox_on_any_node(cluster):
    n1, n2, n3 = cluster
    a, b, c = [await connect(n) for n in cluster]
    try:
        # Agent A creates its mailbox through node 3 and agent B sends through node 2.
        resp = await c.request("$mq9.AI.MAILBOX.CREATE", json.dumps({"ttl": 600}).encode(), timeout=5)
        box = json.loads(resp.data)
        acks = []
        for i in range(5):
            r = await b.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal",
                                json.dumps({"n": i}).encode(), timeout=5)
            acks.append(json.loads(r.data)["msg_id"])
        assert acks == sorted(acks)
        # The owner comes back on node 1 and gets everything, in order.
        got = []
        done = asyncio.Event()

        async def on_msg(msg):
            got.append(json.loads(msg.data)["n"])
            if len(got) == 5:
                done.set()

        await a.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*", cb=on_msg)
        await asyncio.wait_for(done.wait(), 5)
        assert got == [0, 1, 2, 3, 4]
        q = await a.request(f"$mq9.AI.MAILBOX.QUERY.{box['mail_id']}",
                            json.dumps({"token": box["token"]}).encode(), timeout=5)
        assert json.loads(q.data)["unread"] == 0
    finally:
        for nc in (a, b, c):
            await nc.close()


async def test_broadcast_reaches_every_node_once(cluster):
    conns = [await connect(n) for n in cluster for _ in range(2)]
    try:
        counts = [0] * len(conns)

        def counter(i):
            async def cb(msg):
                counts[i] += 1
            return cb

        for i, nc in enumerate(conns):
            await nc.subscribe("$mq9.AI.BROADCAST.pipeline.*", cb=counter(i))
            await settle(nc)
        pub = conns[0]
        for _ in range(20):
            await pub.publish("$mq9.AI.BROADCAST.pipeline.complete", b'{"ok": true}')
        await pub.flush()
        for nc in conns:
            await nc.flush()
        await asyncio.sleep(0.3)
        assert counts == [20] * len(conns)
    finally:
        for nc in conns:
            await nc.close()


async def test_queue_group_exactly_once_cluster_wide(cluster):
    workers = [await connect(n) for n in cluster for _ in range(2)]
    master = await connect(cluster[1])
    try:
        seen: list[tuple[int, str]] = []

        def worker(i):
            async def cb(msg):
                seen.append((i, json.loads(msg.data)["task_id"]))
            return cb

        for i, nc in enumerate(workers):
            await nc.subscribe("$mq9.AI.BROADCAST.task.available", queue="task-workers", cb=worker(i))
            await settle(nc)
        for t in range(300):
            await master.publish("$mq9.AI.BROADCAST.task.available",
                                 json.dumps({"task_id": f"t-{t}"}).encode())
        await master.flush()
        for nc in workers:
            await nc.flush()
        await asyncio.sleep(0.3)
        tasks = [t for _, t in seen]
        assert sorted(tasks) == sorted(f"t-{t}" for t in range(300))  # each exactly once
        assert len({i for i, _ in seen}) >= 3  # spread over workers on several nodes
    finally:
        for nc in workers + [master]:
            await nc.close()


async def test_request_reply_across_nodes(cluster):
    responder = await connect(cluster[2])
    requester = await connect(cluster[0])
    try:
        async def echo(msg):
            await msg.respond(b"re:" + msg.data)

        await responder.subscribe("agents.echo", cb=echo)
        await settle(responder)
        for i in range(20):
            r = await requester.request("agents.echo", b"%d" % i, timeout=5)
            assert r.data == b"re:%d" % i
    finally:
        await responder.close()
        await requester.close()


async def test_dead_owner_answers_unavailable_then_recovers(tmp_path):
    """A node that owns mailboxes dies: acked sends through another node get `unavailable`
    within seconds instead of hanging; when it returns, everything it acked is there."""
    n1 = cluster_node(tmp_path, "d1").start()
    n2 = cluster_node(tmp_path, "d2", join=n1.flags["cluster_port"]).start()
    try:
        wait_members(n1.flags["cluster_port"], 2)
        wait_balanced(n1.flags["cluster_port"], 2)
        time.sleep(0.6)
        nc = await connect(n2)
        name = next(f"agent-{i}" for i in range(1000) if owner_of(n2, f"agent-{i}") == "d1")
        box = json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE",
                                           json.dumps({"ttl": 0, "name": name}).encode(), timeout=5)).data)
        subject = f"$mq9.AI.INBOX.{box['mail_id']}.urgent"
        r = await nc.request(subject, b"before", timeout=5)
        assert json.loads(r.data)["msg_id"] == 1

        n1.kill()  # kill -9 of the supervisor; its children die with it
        assert n1.wait_gone(timeout=10) == []
        t0 = time.monotonic()
        r = await nc.request(subject, b"while down", timeout=10)
        assert json.loads(r.data)["code"] == "unavailable"
        assert time.monotonic() - t0 < 5

        n1.start()  # restarts from its data dir, rejoins without --join
        deadline = time.monotonic() + 30
        while True:
            r = json.loads((await nc.request(subject, b"after", timeout=10)).data)
            if "msg_id" in r or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert r.get("msg_id", 0) >= 2, r
        q = json.loads((await nc.request(f"$mq9.AI.MAILBOX.QUERY.{box['mail_id']}",
                                          json.dumps({"token": box["token"]}).encode(), timeout=5)).data)
        payloads = [m["payload"] for m in q["messages"]]
        assert payloads[0] == "before" and payloads[-1] == "after"
        await nc.close()
    finally:
        n2.close()
        n1.close()


async def test_join_under_load_moves_slots_without_loss(tmp_path):
    """Mailboxes filled on one node; a second node joins while acked sends go on. Slots
    move to it; afterwards every acked message is delivered exactly once, through either
    node."""
    n1 = cluster_node(tmp_path, "j1").start()
    n2 = None
    nc = await connect(n1)
    try:
        boxes = [json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE",
                                              json.dumps({"ttl": 0}).encode(), timeout=5)).data)
                 for _ in range(40)]
        acked: dict[str, list[int]] = {b["mail_id"]: [] for b in boxes}
        stop = asyncio.Event()

        async def sender(box):
            i = 0
            while not stop.is_set():
                try:
                    r = json.loads((await nc.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal",
                                                     json.dumps({"n": i}).encode(), timeout=5)).data)
                except Exception:  # noqa: BLE001 - a timeout is simply "not acked"
                    r = {}
                if "msg_id" in r:
                    acked[box["mail_id"]].append(i)
                i += 1
                await asyncio.sleep(0.01)

        # Five agents stay subscribed through the move: their owner subscriptions must
        # follow the mailboxes to the new node and keep receiving.
        live_conn = await connect(n1)
        live: dict[str, list[int]] = {b["mail_id"]: [] for b in boxes[:5]}
        for mail_id, got in live.items():
            async def on_live(msg, got=got):
                got.append(json.loads(msg.data)["n"])
            await live_conn.subscribe(f"$mq9.AI.INBOX.{mail_id}.*", cb=on_live)
        tasks = [asyncio.create_task(sender(b)) for b in boxes]
        await asyncio.sleep(0.5)
        n2 = cluster_node(tmp_path, "j2", join=n1.flags["cluster_port"])
        await asyncio.to_thread(n2.start)
        await asyncio.to_thread(wait_balanced, n1.flags["cluster_port"], 2, 90)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        moved = [b for b in boxes if owner_of(n1, b["mail_id"]) == "j2"]
        assert moved, "no mailbox changed owner"
        deadline = time.monotonic() + 10
        while any(set(acked[m]) - set(got) for m, got in live.items()):
            assert time.monotonic() < deadline, {
                m: sorted(set(acked[m]) - set(got))[:10] for m, got in live.items()}
            await asyncio.sleep(0.1)
        dupes = sum(len(got) - len(set(got)) for got in live.values())
        print(f"live owner subscriptions through the move: {sum(map(len, live.values()))} "
              f"messages, {dupes} delivered twice")
        await live_conn.close()
        boxes = boxes[5:]  # the others were offline: they replay below

        reader = await connect(n2)
        for box in boxes:
            got = []
            want = len(acked[box["mail_id"]])
            done = asyncio.Event()

            async def on_msg(msg, got=got, done=done, want=want):
                got.append(json.loads(msg.data)["n"])
                if len(got) >= want:
                    done.set()

            sub = await reader.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*", cb=on_msg)
            if want:
                await asyncio.wait_for(done.wait(), 10)
            await asyncio.sleep(0.05)
            await sub.unsubscribe()
            missing = set(acked[box["mail_id"]]) - set(got)
            assert not missing, f"{box['mail_id']}: lost {sorted(missing)[:10]}"
            assert len(got) == len(set(got)), f"{box['mail_id']}: duplicates"
        await reader.close()
    finally:
        await nc.close()
        if n2 is not None:
            n2.close()
        n1.close()


async def test_remove_moves_slots_back_and_stops_the_node(tmp_path):
    n1 = cluster_node(tmp_path, "r1").start()
    n2 = cluster_node(tmp_path, "r2", join=n1.flags["cluster_port"]).start()
    try:
        wait_balanced(n1.flags["cluster_port"], 2)
        time.sleep(0.6)
        nc = await connect(n1)
        names = [f"r-agent-{i}" for i in range(20)]
        assert {owner_of(n1, n) for n in names} == {"r1", "r2"}
        boxes = [json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE",
                                              json.dumps({"name": n}).encode(), timeout=5)).data)
                 for n in names]
        for b in boxes:
            await nc.request(f"$mq9.AI.INBOX.{b['mail_id']}.urgent", b"kept", timeout=5)

        out = subprocess.run([sys.executable, "-m", "mq9", "cluster", "remove", "r2",
                              "--server", f"127.0.0.1:{n1.flags['cluster_port']}", "--timeout", "60"],
                             capture_output=True, text=True, timeout=90, env=child_env(SECRET_ENV))
        assert out.returncode == 0, out.stdout + out.stderr
        st = cluster_status(n1.flags["cluster_port"])
        assert list(st["members"]) == ["r1"] and st["slots_per_node"] == {"r1": 4096}
        assert n2.proc.wait(timeout=30) == 0  # the removed node stops by itself
        time.sleep(0.6)
        for b in boxes:
            q = json.loads((await nc.request(f"$mq9.AI.MAILBOX.QUERY.{b['mail_id']}",
                                             json.dumps({"token": b["token"]}).encode(), timeout=5)).data)
            assert [m["payload"] for m in q["messages"]] == ["kept"], q
        await nc.close()
    finally:
        n2.close()
        n1.close()


async def test_chaos_kill_9_raft_leader_repeatedly_under_acked_load(tmp_path, conns):
    """The node that leads the metadata group is killed (kill -9 of its supervisor, children
    follow) and restarted, again and again, while clients on every node send acked
    messages and owners stay subscribed. Sends to mailboxes of the dead node get
    ``unavailable`` meanwhile; everything acked, also by the node that died, is delivered
    once it is back."""
    import random

    from acked import Sender, collect, kill_whole_node, tally_boxes
    from test_faults import LiveOwner, chaos_seed

    seed = chaos_seed()
    rng = random.Random(seed)
    print(f"\ncluster chaos seed {seed} (MQ9_CHAOS_SEED={seed} replays the choices)")
    nodes = [cluster_node(tmp_path, "c1").start()]
    nodes.append(cluster_node(tmp_path, "c2", join=nodes[0].flags["cluster_port"]).start())
    nodes.append(cluster_node(tmp_path, "c3", join=nodes[1].flags["cluster_port"]).start())
    by_id = {n.flags["node_id"]: n for n in nodes}
    try:
        await asyncio.to_thread(wait_balanced, nodes[0].flags["cluster_port"], 3)
        await asyncio.sleep(0.6)
        servers = [n.url for n in nodes]

        async def client():
            return await conns(servers, allow_reconnect=True, max_reconnect_attempts=10_000,
                               reconnect_time_wait=0.1, dont_randomize=True)

        nc = await conns(nodes[0].url)
        ids = []
        for i in range(12):  # spread over the three owners
            name = f"chaos-{i}-{rng.randrange(1 << 30)}"
            box = json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE",
                                               json.dumps({"ttl": 3600, "name": name}).encode(),
                                               timeout=5)).data)
            ids.append(box["mail_id"])
        owners = {m: owner_of(nodes[0], m) for m in ids}
        assert len(set(owners.values())) == 3, owners
        live_ids = ids[::3]
        owner = LiveOwner()
        sub_nc = await client()
        for m in live_ids:
            await owner.subscribe(sub_nc, m)
        await settle(sub_nc)
        senders = []
        for k, n in enumerate(nodes):
            pub = await conns([n.url] + [u for u in servers if u != n.url], allow_reconnect=True,
                              max_reconnect_attempts=10_000, reconnect_time_wait=0.1,
                              dont_randomize=True)
            senders.append(Sender(pub, ids, timeout=4.0, workers=4, first_seq=k * 10_000_000))

        kills = 3
        t_start = time.monotonic()
        events: list[str] = []

        def leader_among(up: list[Node], not_this: str, timeout: float = 15.0) -> tuple[str | None, float]:
            """The leader the survivors agree on once one is elected, and how long it took."""
            t0 = time.monotonic()
            while True:
                st = cluster_status(up[0].flags["cluster_port"])
                if st.get("leader") not in (None, not_this) or time.monotonic() - t0 > timeout:
                    return st.get("leader"), time.monotonic() - t0
                time.sleep(0.2)

        async def chaos():
            try:
                for _ in range(kills):
                    await asyncio.sleep(rng.uniform(1.0, 2.5))
                    up = [n for n in nodes if n.running]
                    st = await asyncio.to_thread(cluster_status, up[0].flags["cluster_port"])
                    victim = by_id.get(st.get("leader"))
                    assert victim is not None, st
                    t0 = time.monotonic()
                    await asyncio.to_thread(kill_whole_node, victim)
                    down = rng.uniform(1.0, 3.0)
                    rest = [n for n in nodes if n is not victim]
                    new, elected = await asyncio.to_thread(leader_among, rest, st.get("leader"))
                    await asyncio.sleep(max(0.0, down - (time.monotonic() - t0)))
                    await asyncio.to_thread(victim.start)  # rejoins from its data dir
                    events.append(f"{t0 - t_start:.1f}s leader {victim.flags['node_id']} "
                                  f"(term {st.get('term')}) killed, {new} elected in "
                                  f"{elected:.1f}s, killed node ready again after "
                                  f"{time.monotonic() - t0:.1f}s")
                await asyncio.sleep(2.0)  # sends to the last victim's mailboxes succeed again
            finally:
                for s in senders:
                    s.stop = True

        await asyncio.gather(chaos(), *[s.run(120.0) for s in senders])
        elapsed = time.monotonic() - t_start
        sender = Sender(nc, ids).merge(*senders)
        assert len(events) == kills, events
        assert len(sender.acked) > 300, sender.summary()
        assert set(sender.failed) <= {"unavailable", "timeout"}, sender.summary()

        # Every node is back: the rest is pushed to the live owners, the others subscribe.
        fresh = await conns(nodes[2].url)
        later = {m: await collect(fresh, m, len(sender.acked_for(m)), timeout=20)
                 for m in ids if m not in live_ids}
        await owner.quiet(1.0, timeout=20)
        got = {**owner.got, **later}
        lost_all, dup_extra, wrong, per_box = tally_boxes(sender, {m: got[m] for m in ids})
        assert not wrong, wrong[:5]
        lost_all = [(m, owners[m], s) for m, s in lost_all]
        per_box = {m: (owners[m], *v) for m, v in per_box.items()}
        summary = (f"seed {seed}; {elapsed:.1f}s; {len(events)} leader kills: "
                   f"{'; '.join(events)}; {sender.summary()}; "
                   f"{sum(map(len, got.values()))} pushed, {dup_extra} duplicate copies; "
                   f"per mailbox (owner, acked, pushed, duplicated): {per_box}")
        print("cluster chaos:", summary)
        assert not lost_all, f"{len(lost_all)} acked messages lost: {lost_all[:20]}\n{summary}"
        assert dup_extra <= max(100, len(sender.acked) // 10), summary
    finally:
        for n in reversed(nodes):
            n.close()
