"""The user's integration guide (seed/mq9-for-engineer.txt), example by example, against a
real mq9 node with the stock nats-py client.

Each test reads like the guide's example it checks: the same subjects, the same JSON bodies,
the same client calls. Where the guide is vague, SPEC.md decides what is asserted. Nothing is
mocked: every test talks TCP to ``python -m mq9 node`` processes started by the fixtures in
conftest.py (``shared_node`` for tests that cannot disturb each other, ``node`` where a test
restarts or kills the broker, ``node_factory`` for one with a small --max-payload).

Two places where the guide's Python cannot be used literally with nats-py 2.16 (client
behaviour, not the broker's): ``nc = await Client().connect(...)`` leaves ``nc`` None
(``connect`` returns None), and ``subscribe("$mq9.AI.INBOX.m-status-*.normal")`` is refused
client-side with BadSubjectError (that example is Go in the guide; nats.js also accepts it).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import secrets
import signal
import time

import pytest
from agents import create, query
from nats.aio.client import Client
from nats.errors import MaxPayloadError
from nats.errors import TimeoutError as NatsTimeout

T = 5.0  # the longest a single wait may take; failures must not hang the suite


# ---- helpers -----------------------------------------------------------------------------


def uid() -> str:
    return secrets.token_hex(4)


@pytest.fixture
def connect(conns):
    """``await connect(url)`` -> a nats-py connection, closed when the test ends
    (conftest's ``conns``, named as the guide's examples read)."""
    return conns


async def request_json(nc, subject, body) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await nc.request(subject, data, timeout=T)
    return json.loads(resp.data)


def assert_error(reply: dict, code: str) -> None:
    assert isinstance(reply, dict), reply
    assert reply.get("code") == code, reply
    assert isinstance(reply.get("error"), str) and reply["error"], reply


async def next_json(sub, timeout=T) -> dict:
    msg = await sub.next_msg(timeout=timeout)
    return json.loads(msg.data)


async def drain(sub, n, timeout=T) -> list:
    """The next ``n`` messages of a callback-less subscription."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} messages: "
                                 f"{[m.data[:80] for m in out]}")
        out.append(await sub.next_msg(timeout=left))
    return out


async def assert_nothing_more(sub, wait=0.3) -> None:
    try:
        msg = await sub.next_msg(timeout=wait)
    except NatsTimeout:
        return
    raise AssertionError(f"unexpected extra message {msg.subject} {msg.data[:200]!r}")


async def wait_until(pred, timeout=T, step=0.05):
    """Poll an async predicate until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(step)
    return last


class RawSubscriber:
    """A subscription made with the bare protocol (CONNECT, SUB, then MSG/HMSG as they come).

    For subjects nats-py refuses to send: nats-py 2.16 validates subscribe subjects and
    rejects the guide's prefix wildcard ``m-status-*`` (the guide's example is in Go, whose
    client sends it as is). On the wire this is exactly what such a client does.
    """

    def __init__(self, cb=None):
        self.cb = cb  # cb(subject, headers, payload), called in arrival order
        self.messages: list[tuple[str, bytes, bytes]] = []  # (subject, headers, payload)
        self._task = None
        self.error: bytes | None = None

    async def start(self, host, port, subject, queue=""):
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port), T)
        info = await asyncio.wait_for(self.reader.readline(), T)
        assert info.startswith(b"INFO "), info
        q = f" {queue}" if queue else ""
        self.writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                          b'"no_responders":true,"protocol":1}\r\n'
                          + f"SUB {subject}{q} 1\r\nPING\r\n".encode())
        await self.writer.drain()
        line = await asyncio.wait_for(self.reader.readline(), T)
        if line != b"PONG\r\n":
            raise AssertionError(f"SUB {subject} answered {line!r}")
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        r = self.reader
        while True:
            line = await r.readline()
            if not line:
                return
            parts = line.split()
            if parts[0] == b"PING":
                self.writer.write(b"PONG\r\n")
            elif parts[0] == b"MSG":
                payload = (await r.readexactly(int(parts[-1]) + 2))[:-2]
                self._got(parts[1].decode(), b"", payload)
            elif parts[0] == b"HMSG":
                hlen, total = int(parts[-2]), int(parts[-1])
                data = (await r.readexactly(total + 2))[:-2]
                self._got(parts[1].decode(), data[:hlen], data[hlen:])
            elif parts[0] == b"-ERR":
                self.error = line

    def _got(self, subject, headers, payload):
        self.messages.append((subject, headers, payload))
        if self.cb:
            self.cb(subject, headers, payload)

    async def close(self):
        if self._task:
            self._task.cancel()
        self.writer.close()


# mail_id: "m-" + >= 96 random bits as lowercase base32 (>= 20 chars) or hex (>= 24 chars)
MAIL_ID_RE = re.compile(r"^m-(?:[a-z2-7]{20,}|[0-9a-f]{24,})$")
# token: "tok-" + >= 128 random bits as lowercase base32 (>= 26 chars) or hex (>= 32 chars)
TOKEN_RE = re.compile(r"^tok-(?:[a-z2-7]{26,}|[0-9a-f]{32,})$")


def expires_at_seconds(value) -> float:
    """expires_at as Unix seconds, whether the broker writes seconds, milliseconds or ISO."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000 if value > 1e11 else float(value)
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"expires_at has an unexpected form: {value!r}")


# ---- 30-second demo ----------------------------------------------------------------------


async def test_thirty_second_demo(shared_node, connect):
    nc = await connect(shared_node.url)

    # Agent A creates a mailbox
    resp = await nc.request("$mq9.AI.MAILBOX.CREATE",
                            json.dumps({"type": "standard", "ttl": 3600}).encode(), timeout=T)
    agent_a = json.loads(resp.data)
    # Agent B creates a mailbox
    resp = await nc.request("$mq9.AI.MAILBOX.CREATE",
                            json.dumps({"type": "standard", "ttl": 3600}).encode(), timeout=T)
    agent_b = json.loads(resp.data)
    assert agent_a["mail_id"] != agent_b["mail_id"]

    received = asyncio.Event()
    got = []

    # Agent B subscribes to its inbox
    async def on_message(msg):
        data = json.loads(msg.data)
        got.append(data)
        # Reply to Agent A
        if data.get("reply_to"):
            await nc.publish(data["reply_to"],
                             json.dumps({"from": agent_b["mail_id"],
                                         "type": "result",
                                         "correlation_id": data["correlation_id"],
                                         "payload": "task complete"}).encode())
        received.set()

    await nc.subscribe(f"$mq9.AI.INBOX.{agent_b['mail_id']}.*", cb=on_message)

    # Agent A sends a task to Agent B
    await nc.publish(f"$mq9.AI.INBOX.{agent_b['mail_id']}.normal",
                     json.dumps({"from": agent_a["mail_id"],
                                 "type": "task",
                                 "correlation_id": "demo-001",
                                 "reply_to": f"$mq9.AI.INBOX.{agent_a['mail_id']}.normal",
                                 "payload": "analyze this"}).encode())

    await asyncio.wait_for(received.wait(), T)
    assert got[0]["payload"] == "analyze this"
    assert got[0]["from"] == agent_a["mail_id"]

    # Agent A was not listening when B replied: it comes back later and gets the reply.
    a_again = await connect(shared_node.url)
    sub = await a_again.subscribe(f"$mq9.AI.INBOX.{agent_a['mail_id']}.*")
    reply = await next_json(sub)
    assert reply == {"from": agent_b["mail_id"], "type": "result",
                     "correlation_id": "demo-001", "payload": "task complete"}
    await assert_nothing_more(sub)


# ---- core operations ---------------------------------------------------------------------


async def test_create_mailbox(shared_node):
    # The guide's own form: a Client object, then connect. (nats-py's Client.connect returns
    # None, so the guide's `nc = await Client().connect(...)` cannot be used literally; this is
    # the same client and the same call.)
    nc = Client()
    await nc.connect(shared_node.url, connect_timeout=T, allow_reconnect=False)
    try:
        before = time.time()
        resp = await nc.request(
            "$mq9.AI.MAILBOX.CREATE",
            json.dumps({"type": "standard", "ttl": 3600}).encode(),
            timeout=T,
        )
        mailbox = json.loads(resp.data)
        mail_id = mailbox["mail_id"]
        token = mailbox["token"]

        assert set(mailbox) >= {"mail_id", "token", "type", "ttl", "expires_at"}, mailbox
        assert MAIL_ID_RE.match(mail_id), mail_id
        assert TOKEN_RE.match(token), token
        assert mailbox["type"] == "standard"
        assert mailbox["ttl"] == 3600
        exp = expires_at_seconds(mailbox["expires_at"])
        assert before + 3600 - 5 <= exp <= time.time() + 3600 + 5, mailbox["expires_at"]

        # Random, never repeated.
        others = [await create(nc, type="standard", ttl=3600) for _ in range(5)]
        ids = {mail_id} | {o["mail_id"] for o in others}
        tokens = {token} | {o["token"] for o in others}
        assert len(ids) == 6 and len(tokens) == 6

        # An empty body is a standard mailbox with the default TTL (one day).
        default = json.loads((await nc.request("$mq9.AI.MAILBOX.CREATE", b"", timeout=T)).data)
        assert default["type"] == "standard" and default["ttl"] == 86400, default

        # A fresh mailbox is empty.
        q = await query(nc, mail_id, token)
        assert q["mail_id"] == mail_id and q["unread"] == 0 and q["messages"] == [], q
    finally:
        await nc.close()


async def test_send_subscribe_and_receive(shared_node, connect):
    sender = await connect(shared_node.url)
    receiver = await connect(shared_node.url)
    mail_id = (await create(sender, type="standard", ttl=3600))["mail_id"]
    target_mail_id = (await create(receiver, type="standard", ttl=3600))["mail_id"]

    # Send a message (the sender's own inbox is where the result comes back)
    sender_inbox = await sender.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    await sender.publish(
        f"$mq9.AI.INBOX.{target_mail_id}.normal",
        json.dumps({
            "from": mail_id,
            "type": "task",
            "correlation_id": "req-001",
            "reply_to": f"$mq9.AI.INBOX.{mail_id}.normal",
            "payload": {"data": "..."},
        }).encode(),
    )

    # Subscribe and receive (the receiver's code uses `nc` and its own `mail_id`)
    nc, my_mail_id = receiver, target_mail_id
    seen = []

    async def on_message(msg):
        data = json.loads(msg.data)
        seen.append((msg.subject, data))
        if data.get("reply_to"):
            await nc.publish(data["reply_to"], json.dumps({
                "from": my_mail_id,
                "type": "result",
                "correlation_id": data["correlation_id"],
                "payload": {"status": "done"},
            }).encode())

    await nc.subscribe(f"$mq9.AI.INBOX.{my_mail_id}.*", cb=on_message)

    result = await next_json(sender_inbox)
    assert result == {"from": target_mail_id, "type": "result",
                      "correlation_id": "req-001", "payload": {"status": "done"}}
    assert seen[0][0] == f"$mq9.AI.INBOX.{target_mail_id}.normal"
    assert seen[0][1]["payload"] == {"data": "..."}
    assert len(seen) == 1


async def test_broadcast_pipeline_wildcard(shared_node, connect):
    publisher = await connect(shared_node.url)
    mail_id = (await create(publisher, type="standard", ttl=3600))["mail_id"]
    run = uid()

    subscribers = []
    for _ in range(3):  # several agents, each on its own connection
        nc = await connect(shared_node.url)
        got = []

        async def handler(msg, got=got):
            got.append((msg.subject, json.loads(msg.data)))

        await nc.subscribe("$mq9.AI.BROADCAST.pipeline.*", cb=handler)
        await nc.flush(timeout=T)
        subscribers.append(got)

    await publisher.publish(
        "$mq9.AI.BROADCAST.pipeline.complete",
        json.dumps({"from": mail_id, "stage": "preprocessing", "ok": True, "run": run}).encode(),
    )
    # Not matched by `pipeline.*`: another domain, and a deeper subject.
    await publisher.publish("$mq9.AI.BROADCAST.other.complete", json.dumps({"run": run}).encode())
    await publisher.publish("$mq9.AI.BROADCAST.pipeline.stage.done",
                            json.dumps({"run": run}).encode())
    await publisher.publish("$mq9.AI.BROADCAST.pipeline.started",
                            json.dumps({"from": mail_id, "run": run}).encode())
    await publisher.flush(timeout=T)

    async def everyone_has_two():
        return all(len([g for g in got if g[1].get("run") == run]) >= 2 for got in subscribers)

    assert await wait_until(everyone_has_two), subscribers
    await asyncio.sleep(0.2)
    for got in subscribers:
        mine = [g for g in got if g[1].get("run") == run]
        assert [s for s, _ in mine] == ["$mq9.AI.BROADCAST.pipeline.complete",
                                        "$mq9.AI.BROADCAST.pipeline.started"], mine
        assert mine[0][1] == {"from": mail_id, "stage": "preprocessing", "ok": True, "run": run}


async def test_query_for_missed_messages(shared_node, connect):
    nc = await connect(shared_node.url)
    box = await create(nc, type="standard", ttl=3600)
    mail_id, token = box["mail_id"], box["token"]

    sent = [("notify", "n1"), ("normal", "a1"), ("urgent", "u1"), ("normal", "a2"),
            ("urgent", "u2"), ("notify", "n2")]
    for prio, text in sent:
        await nc.request(f"$mq9.AI.INBOX.{mail_id}.{prio}",
                         json.dumps({"from": "peer", "payload": text}).encode(), timeout=T)

    resp = await nc.request(
        f"$mq9.AI.MAILBOX.QUERY.{mail_id}",
        json.dumps({"token": token}).encode(),
        timeout=T,
    )
    result = json.loads(resp.data)
    assert result["unread"] == 6, result
    assert result["mail_id"] == mail_id
    msgs = result["messages"]
    # delivery order: urgent, normal, notify; oldest first within a priority
    assert [json.loads(m["payload"])["payload"] for m in msgs] == ["u1", "u2", "a1", "a2",
                                                                   "n1", "n2"]
    for m in msgs:
        assert set(m) >= {"msg_id", "priority", "subject", "ts", "payload"}, m
        assert m["subject"] == f"$mq9.AI.INBOX.{mail_id}.{m['priority']}"
    assert [m["priority"] for m in msgs] == ["urgent", "urgent", "normal", "normal",
                                             "notify", "notify"]
    ids = {p: [m["msg_id"] for m in msgs if m["priority"] == p] for p in ("urgent", "normal")}
    assert ids["urgent"][0] < ids["urgent"][1] and ids["normal"][0] < ids["normal"][1]

    # Querying does not consume: the same answer again.
    again = await query(nc, mail_id, token)
    assert again["unread"] == 6 and again["messages"] == msgs

    # limit
    two = await query(nc, mail_id, token, limit=2)
    assert [m["msg_id"] for m in two["messages"]] == [m["msg_id"] for m in msgs[:2]]
    assert two["unread"] in (2, 6), two  # SPEC leaves open whether unread counts past limit

    # mark_read consumes what it returned
    read = await query(nc, mail_id, token, mark_read=True)
    assert [m["msg_id"] for m in read["messages"]] == [m["msg_id"] for m in msgs]
    after = await query(nc, mail_id, token)
    assert after["unread"] == 0 and after["messages"] == [], after
    # ... and a subscriber is not sent them again
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    await assert_nothing_more(sub, 0.4)

    # binary payloads come back base64-encoded
    blob = bytes(range(256))
    box2 = await create(nc, type="standard", ttl=3600)
    await nc.request(f"$mq9.AI.INBOX.{box2['mail_id']}.normal", blob, timeout=T)
    q2 = await query(nc, box2["mail_id"], box2["token"])
    assert q2["messages"][0].get("encoding") == "base64", q2
    assert base64.b64decode(q2["messages"][0]["payload"]) == blob


# ---- common patterns ---------------------------------------------------------------------


async def test_child_agent_reports_result_to_parent(shared_node, connect):
    nc = await connect(shared_node.url)                 # parent
    parent_id = (await create(nc, type="standard", ttl=3600))["mail_id"]
    worker_nc = await connect(shared_node.url)          # child agent, its own process/connection
    worker_id = (await create(worker_nc, type="standard", ttl=600))["mail_id"]

    # Parent sends tasks before the child is even listening
    for job in ("job-001", "job-002", "job-003"):
        await nc.publish(f"$mq9.AI.INBOX.{worker_id}.normal", json.dumps({
            "from": parent_id,
            "type": "work",
            "correlation_id": job,
            "reply_to": f"$mq9.AI.INBOX.{parent_id}.normal",
            "payload": {"data": [job]},
        }).encode())
    await nc.flush(timeout=T)

    # Child: does the work, reports to reply_to
    async def work(msg):
        d = json.loads(msg.data)
        await worker_nc.publish(d["reply_to"], json.dumps({
            "from": worker_id,
            "type": "result",
            "correlation_id": d["correlation_id"],
            "payload": {"done": d["payload"]["data"]},
        }).encode())

    await worker_nc.subscribe(f"$mq9.AI.INBOX.{worker_id}.*", cb=work)

    # Parent collects results — non-blocking
    results = {}

    async def collect(msg):
        d = json.loads(msg.data)
        results[d["correlation_id"]] = d["payload"]

    await nc.subscribe(f"$mq9.AI.INBOX.{parent_id}.*", cb=collect)

    async def all_in():
        return len(results) == 3

    assert await wait_until(all_in), results
    assert results == {j: {"done": [j]} for j in ("job-001", "job-002", "job-003")}


async def test_orchestrator_monitors_all_worker_states(shared_node, connect):
    # Orchestrator: one subscription covers all workers (sent on the wire as the guide's Go
    # client sends it; see RawSubscriber for why not through nats-py)
    orch = await connect(shared_node.url)
    workers = {}
    seen = []

    def on_status(subject, headers, data):
        s = json.loads(data)
        seen.append((subject, s))
        workers[s["from"]] = s

    monitor = await RawSubscriber(cb=on_status).start(shared_node.host, shared_node.port,
                                                      "$mq9.AI.INBOX.m-status-*.normal")

    # Workers: latest-type mailboxes, state updates overwrite previous
    boxes = {}
    for n in (1, 2, 3):
        nc = await connect(shared_node.url)
        box = await create(nc, type="latest", ttl=7200, name=f"m-status-worker-{n}")
        assert box["mail_id"] == f"m-status-worker-{n}" and box["type"] == "latest", box
        boxes[n] = (nc, box)

    for step, (status, load) in enumerate([("starting", 0.0), ("processing", 0.7),
                                           ("idle", 0.1)]):
        for n, (nc, box) in boxes.items():
            status_id = box["mail_id"]
            await nc.publish(f"$mq9.AI.INBOX.{status_id}.normal",
                             json.dumps({"from": f"worker-{n}", "status": status,
                                         "load": load, "step": step}).encode())
            await nc.flush(timeout=T)

    async def all_idle():
        return len(seen) >= 9 and all(workers.get(f"worker-{n}", {}).get("status") == "idle"
                                      for n in (1, 2, 3))

    assert await wait_until(all_idle), seen
    await asyncio.sleep(0.2)
    await monitor.close()
    # the monitor saw every live update, in order per worker
    assert len(seen) == 9, seen
    for n in (1, 2, 3):
        mine = [s for subj, s in seen if s["from"] == f"worker-{n}"]
        assert [s["status"] for s in mine] == ["starting", "processing", "idle"]
        assert all(subj == f"$mq9.AI.INBOX.m-status-worker-{n}.normal"
                   for subj, s in seen if s["from"] == f"worker-{n}")

    # each latest mailbox keeps only the newest state (and the monitor marked nothing read)
    for n, (_nc, box) in boxes.items():
        q = await query(orch, box["mail_id"], box["token"])
        assert q["unread"] == 1, q
        assert len(q["messages"]) == 1
        assert json.loads(q["messages"][0]["payload"]) == {"from": f"worker-{n}",
                                                          "status": "idle", "load": 0.1,
                                                          "step": 2}

    # a worker that comes back to its own status mailbox sees only its newest state
    nc, box = boxes[2]
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*")
    assert (await next_json(sub))["status"] == "idle"
    await assert_nothing_more(sub)

    for _n, (nc, box) in boxes.items():
        await request_json(nc, f"$mq9.AI.MAILBOX.DELETE.{box['mail_id']}",
                           {"token": box["token"]})


async def test_task_broadcast_with_competing_workers(shared_node, connect):
    master = await connect(shared_node.url)
    master_id = (await create(master, type="standard", ttl=3600))["mail_id"]

    # Workers subscribe with shared queue group — each task goes to exactly one worker
    handled = {}
    for w in range(3):
        nc = await connect(shared_node.url)  # each worker its own connection
        worker_id = f"worker-{w}"
        handled[worker_id] = []

        async def on_task(msg, nc=nc, worker_id=worker_id):
            task = json.loads(msg.data)
            handled[worker_id].append(task["task_id"])
            result = {"processed": task["data"]}
            await nc.publish(f"$mq9.AI.INBOX.{master_id}.normal",
                             json.dumps({"from": worker_id, "task_id": task["task_id"],
                                         "result": result}).encode())

        await nc.subscribe("$mq9.AI.BROADCAST.task.available", queue="task-workers", cb=on_task)
        await nc.flush(timeout=T)

    results = await master.subscribe(f"$mq9.AI.INBOX.{master_id}.*")

    # Master broadcasts tasks
    n_tasks = 30
    for i in range(n_tasks):
        await master.publish("$mq9.AI.BROADCAST.task.available",
                             json.dumps({"from": master_id, "task_id": f"t-{i:03d}",
                                         "data": {"i": i}}).encode())
    await master.flush(timeout=T)

    got = [json.loads(m.data) for m in await drain(results, n_tasks)]
    await assert_nothing_more(results)
    assert sorted(r["task_id"] for r in got) == [f"t-{i:03d}" for i in range(n_tasks)]
    for r in got:
        assert r["result"] == {"processed": {"i": int(r["task_id"][2:])}}
    all_handled = [t for ts in handled.values() for t in ts]
    assert len(all_handled) == n_tasks and len(set(all_handled)) == n_tasks, handled
    busy = [w for w, ts in handled.items() if ts]
    assert len(busy) >= 2, f"one worker took every task: {handled}"


async def test_cloud_to_offline_edge_device(shared_node, connect):
    # The edge device registered its mailbox once, then went offline for hours.
    edge_nc = await connect(shared_node.url)
    edge = await create(edge_nc, type="standard", ttl=3600)
    edge_id, edge_token = edge["mail_id"], edge["token"]
    await edge_nc.close()

    # Cloud: send commands — edge may be offline for hours
    cloud = await connect(shared_node.url)
    await cloud.publish(f"$mq9.AI.INBOX.{edge_id}.urgent",
                        b'{"command":"emergency_stop","reason":"temperature_critical"}')
    await cloud.publish(f"$mq9.AI.INBOX.{edge_id}.normal",
                        b'{"command":"update_config","interval":30}')
    # a second round, normal before urgent, so the ordering is not just arrival order
    await cloud.publish(f"$mq9.AI.INBOX.{edge_id}.normal",
                        b'{"command":"update_config","interval":60}')
    await cloud.request(f"$mq9.AI.INBOX.{edge_id}.urgent",
                        b'{"command":"resume","reason":"temperature_ok"}', timeout=T)

    # Edge: on reconnect, query fallback shows everything pending
    nc = await connect(shared_node.url)
    pending = await query(nc, edge_id, edge_token)
    assert pending["unread"] == 4, pending
    assert [json.loads(m["payload"])["command"] for m in pending["messages"]] == [
        "emergency_stop", "resume", "update_config", "update_config"]

    # Edge: subscribe (urgent first), then normal
    arrived = []

    async def urgent_handler(msg):
        arrived.append(("urgent", json.loads(msg.data)))

    async def normal_handler(msg):
        arrived.append(("normal", json.loads(msg.data)))

    await nc.subscribe(f"$mq9.AI.INBOX.{edge_id}.urgent", cb=urgent_handler)
    await nc.subscribe(f"$mq9.AI.INBOX.{edge_id}.normal", cb=normal_handler)

    async def four():
        return len(arrived) >= 4

    assert await wait_until(four), arrived
    await asyncio.sleep(0.2)
    assert arrived == [
        ("urgent", {"command": "emergency_stop", "reason": "temperature_critical"}),
        ("urgent", {"command": "resume", "reason": "temperature_ok"}),
        ("normal", {"command": "update_config", "interval": 30}),
        ("normal", {"command": "update_config", "interval": 60}),
    ]

    # Query fallback after delivery: nothing left unread
    async def drained():
        q = await query(nc, edge_id, edge_token)
        return q if q["unread"] == 0 else None

    assert await wait_until(drained), await query(nc, edge_id, edge_token)


async def test_human_in_the_loop_approval(shared_node, connect):
    agent = await connect(shared_node.url)
    agent_mail_id = (await create(agent, type="standard", ttl=3600))["mail_id"]
    human_nc = await connect(shared_node.url)
    human_mail_id = (await create(human_nc, type="standard", ttl=86400))["mail_id"]
    await human_nc.close()  # the human is away

    # Agent sends approval request
    await agent.publish(f"$mq9.AI.INBOX.{human_mail_id}.urgent", json.dumps({
        "from": agent_mail_id,
        "type": "approval_request",
        "correlation_id": "approval-001",
        "content": "Call external fraud API — estimated cost $50",
        "reply_to": f"$mq9.AI.INBOX.{agent_mail_id}.normal",
    }).encode())
    answers = await agent.subscribe(f"$mq9.AI.INBOX.{agent_mail_id}.*")

    # Human's client — same protocol, no special tooling
    nc = await connect(shared_node.url)
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{human_mail_id}.*")
    msg = await sub.next_msg(timeout=T)
    req = json.loads(msg.data)
    assert msg.subject == f"$mq9.AI.INBOX.{human_mail_id}.urgent"
    approved = "$50" in req["content"]  # showApprovalUI
    await nc.publish(req["reply_to"], json.dumps({
        "from": human_mail_id,
        "type": "approval_response",
        "correlation_id": req["correlation_id"],
        "approved": approved,
    }).encode())

    answer = await next_json(answers)
    assert answer == {"from": human_mail_id, "type": "approval_response",
                      "correlation_id": "approval-001", "approved": True}


async def test_capability_registration_and_discovery(shared_node, connect):
    run = uid()
    orch = await connect(shared_node.url)

    # Orchestrator builds live index from announcements
    index: dict[str, list[str]] = {}

    async def on_capability(msg):
        reg = json.loads(msg.data)
        if reg.get("run") != run:
            return
        for cap in reg["capabilities"]:
            index.setdefault(cap, []).append(reg["from"])

    await orch.subscribe("$mq9.AI.BROADCAST.system.capability", cb=on_capability)
    await orch.flush(timeout=T)

    # Agents announce capabilities on startup
    agents = {}
    for caps in (["data.analysis", "ml.training"], ["data.analysis"], ["ml.training"]):
        nc = await connect(shared_node.url)
        agent_id = (await create(nc, type="standard", ttl=3600))["mail_id"]
        agents[agent_id] = (nc, caps)
        await nc.publish("$mq9.AI.BROADCAST.system.capability", json.dumps({
            "from": agent_id,
            "capabilities": caps,
            "reply_to": f"$mq9.AI.INBOX.{agent_id}.normal",
            "run": run,
        }).encode())
        await nc.flush(timeout=T)

    async def indexed():
        return len(index.get("ml.training", [])) == 2 and len(index.get("data.analysis", [])) == 2

    assert await wait_until(indexed), index
    trainers = {a for a, (_, caps) in agents.items() if "ml.training" in caps}
    assert set(index["ml.training"]) == trainers

    # Dispatch to capable Agent
    task = json.dumps({"type": "task", "job": "train", "run": run}).encode()
    for agent_id in index["ml.training"]:
        await orch.publish(f"$mq9.AI.INBOX.{agent_id}.normal", task)
    await orch.flush(timeout=T)

    for agent_id, (nc, _caps) in agents.items():
        sub = await nc.subscribe(f"$mq9.AI.INBOX.{agent_id}.*")
        if agent_id in trainers:
            assert (await next_json(sub))["job"] == "train"
        await assert_nothing_more(sub, 0.2)


async def test_request_reply_with_correlation_id(shared_node, connect):
    requester = await connect(shared_node.url)
    req_id = (await create(requester, type="standard", ttl=3600))["mail_id"]
    responder = await connect(shared_node.url)
    resp_id = (await create(responder, type="standard", ttl=3600))["mail_id"]

    inbox = await requester.subscribe(f"$mq9.AI.INBOX.{req_id}.*")
    questions = {f"q-{i}": i for i in range(5)}
    for cid, i in questions.items():
        await requester.publish(f"$mq9.AI.INBOX.{resp_id}.normal", json.dumps({
            "from": req_id, "type": "request", "correlation_id": cid,
            "reply_to": f"$mq9.AI.INBOX.{req_id}.normal", "payload": {"x": i},
        }).encode())
    await requester.flush(timeout=T)

    # the responder answers in its own order (newest first)
    work = await responder.subscribe(f"$mq9.AI.INBOX.{resp_id}.*")
    reqs = [json.loads(m.data) for m in await drain(work, 5)]
    for r in reversed(reqs):
        await responder.publish(r["reply_to"], json.dumps({
            "from": resp_id, "type": "response", "correlation_id": r["correlation_id"],
            "payload": {"square": r["payload"]["x"] ** 2},
        }).encode())

    answers = {}
    for m in await drain(inbox, 5):
        d = json.loads(m.data)
        answers[d["correlation_id"]] = d["payload"]["square"]
    assert answers == {cid: i * i for cid, i in questions.items()}


# ---- SPEC details the guide relies on ----------------------------------------------------


async def test_send_with_reply_subject_is_acknowledged(shared_node, connect):
    nc = await connect(shared_node.url)
    mail_id = (await create(nc, type="standard", ttl=3600))["mail_id"]

    acks = []
    for prio in ("normal", "urgent", "notify", "normal", "normal"):
        ack = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.{prio}",
                                 {"from": "x", "payload": prio})
        assert set(ack) == {"mail_id", "msg_id", "priority"}, ack
        assert ack["mail_id"] == mail_id and ack["priority"] == prio
        acks.append(ack["msg_id"])
    assert all(a < b for a, b in zip(acks, acks[1:])), acks

    # an unknown priority is a bad request
    bad = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.whenever", {"payload": 1})
    assert_error(bad, "bad_request")


async def test_replay_order_urgent_normal_notify_oldest_first(shared_node, connect):
    nc = await connect(shared_node.url)
    mail_id = (await create(nc, type="standard", ttl=3600))["mail_id"]
    order = ["notify", "normal", "urgent", "notify", "urgent", "normal", "urgent", "notify"]
    for i, prio in enumerate(order):
        await nc.request(f"$mq9.AI.INBOX.{mail_id}.{prio}", f"{prio}-{i}".encode(), timeout=T)

    owner = await connect(shared_node.url)
    sub = await owner.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    msgs = await drain(sub, len(order))
    expected = [f"{p}-{i}" for p in ("urgent", "normal", "notify")
                for i, q in enumerate(order) if q == p]
    assert [m.data.decode() for m in msgs] == expected
    # pushed messages keep the sender's subject
    assert [m.subject for m in msgs] == [f"$mq9.AI.INBOX.{mail_id}.{d.split('-')[0]}"
                                         for d in expected]
    await assert_nothing_more(sub)


async def test_pushed_messages_carry_mq9_headers(shared_node, connect):
    nc = await connect(shared_node.url)
    mail_id = (await create(nc, type="standard", ttl=3600))["mail_id"]

    # stored before the subscription, with a header of the sender's own
    ack1 = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.urgent", {"n": 1})
    resp = await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", b'{"n": 2}',
                            headers={"X-Trace": "abc-123"}, timeout=T)
    ack2 = json.loads(resp.data)

    owner = await connect(shared_node.url)
    sub = await owner.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    m1, m2 = await drain(sub, 2)
    assert m1.headers and m1.headers.get("Mq9-Msg-Id") == str(ack1["msg_id"]), m1.headers
    assert m1.headers.get("Mq9-Priority") == "urgent"
    assert m2.headers.get("Mq9-Msg-Id") == str(ack2["msg_id"]), m2.headers
    assert m2.headers.get("Mq9-Priority") == "normal"
    assert m2.headers.get("X-Trace") == "abc-123", m2.headers  # message headers are kept

    # and a live one
    ack3 = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.notify", {"n": 3})
    m3 = await sub.next_msg(timeout=T)
    assert json.loads(m3.data) == {"n": 3}
    assert m3.headers.get("Mq9-Msg-Id") == str(ack3["msg_id"])
    assert m3.headers.get("Mq9-Priority") == "notify"


async def test_owner_queue_group_gets_each_message_once(shared_node, connect):
    nc = await connect(shared_node.url)
    mail_id = (await create(nc, type="standard", ttl=3600))["mail_id"]
    stored = 12
    for i in range(stored):
        await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", f"s{i}".encode(), timeout=T)

    got = []
    for member in range(3):
        c = await connect(shared_node.url)

        async def cb(msg, member=member):
            got.append((member, msg.data.decode()))

        await c.subscribe(f"$mq9.AI.INBOX.{mail_id}.*", queue="owners", cb=cb)
        await c.flush(timeout=T)

    live = 12
    for i in range(live):
        await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", f"l{i}".encode(), timeout=T)

    async def all_in():
        return len(got) >= stored + live

    assert await wait_until(all_in), got
    await asyncio.sleep(0.3)
    payloads = [p for _, p in got]
    assert sorted(payloads) == sorted([f"s{i}" for i in range(stored)] +
                                      [f"l{i}" for i in range(live)]), got


async def test_monitor_sees_traffic_and_marks_nothing_delivered(shared_node, connect):
    nc = await connect(shared_node.url)
    box = await create(nc, type="standard", ttl=3600)
    mail_id, token = box["mail_id"], box["token"]

    monitors = {}
    for pattern in ("$mq9.AI.#", "$mq9.AI.>", "$mq9.AI.INBOX.*.normal"):
        c = await connect(shared_node.url)
        seen = []

        async def cb(msg, seen=seen):
            if mail_id in msg.subject:
                seen.append((msg.subject, msg.data))

        await c.subscribe(pattern, cb=cb)
        await c.flush(timeout=T)
        monitors[pattern] = seen

    await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", b'{"watch":"me"}', timeout=T)
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.urgent", b'{"watch":"me too"}', timeout=T)

    async def all_seen():
        return (len(monitors["$mq9.AI.#"]) >= 2 and len(monitors["$mq9.AI.>"]) >= 2
                and len(monitors["$mq9.AI.INBOX.*.normal"]) >= 1)

    assert await wait_until(all_seen), monitors
    await asyncio.sleep(0.2)
    for pattern in ("$mq9.AI.#", "$mq9.AI.>"):
        sends = [(s, d) for s, d in monitors[pattern] if s.startswith("$mq9.AI.INBOX.")]
        assert sends == [(f"$mq9.AI.INBOX.{mail_id}.normal", b'{"watch":"me"}'),
                         (f"$mq9.AI.INBOX.{mail_id}.urgent", b'{"watch":"me too"}')], pattern
    assert monitors["$mq9.AI.INBOX.*.normal"] == [(f"$mq9.AI.INBOX.{mail_id}.normal",
                                                   b'{"watch":"me"}')]

    # monitors never mark anything delivered, and they never get a replay
    q = await query(nc, mail_id, token)
    assert q["unread"] == 2, q
    late = await connect(shared_node.url)
    late_sub = await late.subscribe("$mq9.AI.INBOX.*.normal")
    owner_sub = await late.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    assert len(await drain(owner_sub, 2)) == 2
    await assert_nothing_more(owner_sub, 0.2)
    try:
        stray = await late_sub.next_msg(timeout=0.3)
        assert mail_id not in stray.subject, "a monitor was sent a replay"
    except NatsTimeout:
        pass


# ---- the guide's error table -------------------------------------------------------------


async def test_create_failure_returns_error_response(shared_node, connect):
    nc = await connect(shared_node.url)

    async def create_raw(body: bytes) -> dict:
        resp = await nc.request("$mq9.AI.MAILBOX.CREATE", body, timeout=T)
        return json.loads(resp.data)

    assert_error(await create_raw(b'{"type": "standard", "ttl": '), "bad_request")
    assert_error(await create_raw(b"not json at all"), "bad_request")
    assert_error(await create_raw(b'["standard", 3600]'), "bad_request")
    assert_error(await create_raw(json.dumps({"type": "priority-queue"}).encode()),
                 "bad_request")
    assert_error(await create_raw(json.dumps({"type": "standard", "ttl": -1}).encode()),
                 "bad_request")
    assert_error(await create_raw(json.dumps({"type": "standard", "ttl": "1h"}).encode()),
                 "bad_request")

    name = f"agent-{uid()}"
    first = await create(nc, type="standard", ttl=3600, name=name)
    assert first["mail_id"] == name
    assert_error(await create_raw(json.dumps({"type": "standard", "name": name}).encode()),
                 "exists")
    assert_error(await create_raw(json.dumps({"name": "has space"}).encode()), "bad_request")

    # the broker is still fine after all of that
    ok = await create(nc, type="standard", ttl=3600)
    assert MAIL_ID_RE.match(ok["mail_id"])


async def test_send_to_unknown_or_expired_mail_id_is_dropped_silently(shared_node, connect):
    errors = []

    async def error_cb(e):
        errors.append(e)

    nc = await connect(shared_node.url, error_cb=error_cb)
    unknown = f"m-{secrets.token_hex(12)}"
    expired = await create(nc, type="standard", ttl=1)
    await nc.request(f"$mq9.AI.INBOX.{expired['mail_id']}.normal", b"before", timeout=T)

    async def gone():
        r = await query(nc, expired["mail_id"], expired["token"])
        return r.get("code") == "not_found"

    assert await wait_until(gone, timeout=3.5, step=0.2)

    for target in (unknown, expired["mail_id"]):
        await nc.publish(f"$mq9.AI.INBOX.{target}.normal",
                         json.dumps({"from": "x", "payload": "lost"}).encode())
        await nc.publish(f"$mq9.AI.INBOX.{target}.urgent", b"lost too")
    await nc.flush(timeout=T)
    await asyncio.sleep(0.1)
    assert nc.is_connected and not errors, errors

    # with a NATS reply subject the sender is told
    for target in (unknown, expired["mail_id"]):
        r = await request_json(nc, f"$mq9.AI.INBOX.{target}.normal", {"payload": "x"})
        assert_error(r, "not_found")

    # and the dropped message did not create anything
    assert_error(await query(nc, unknown, "tok-whatever"), "not_found")


async def test_query_with_wrong_token_returns_auth_error(shared_node, connect):
    nc = await connect(shared_node.url)
    box = await create(nc, type="standard", ttl=3600)
    await nc.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal", b"secret", timeout=T)

    other = await create(nc, type="standard", ttl=3600)
    for body in ({"token": other["token"]}, {"token": "tok-" + "0" * 32}, {"token": ""}, {}):
        r = await request_json(nc, f"$mq9.AI.MAILBOX.QUERY.{box['mail_id']}", body)
        assert_error(r, "auth")
        assert "messages" not in r
    # the right token still works, and the failed attempts consumed nothing
    ok = await query(nc, box["mail_id"], box["token"])
    assert ok["unread"] == 1 and ok["messages"][0]["payload"] == "secret"
    # querying a mailbox that does not exist
    assert_error(await query(nc, f"m-{secrets.token_hex(12)}", box["token"]), "not_found")


async def test_ttl_expiry_deletes_mailbox_and_messages(shared_node, connect):
    nc = await connect(shared_node.url)
    forever = await create(nc, type="standard", ttl=0)  # ttl 0 never expires
    assert forever["ttl"] == 0
    box = await create(nc, type="standard", ttl=1)
    mail_id, token = box["mail_id"], box["token"]
    assert box["ttl"] == 1
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.urgent", b"short-lived", timeout=T)
    assert (await query(nc, mail_id, token))["unread"] == 1
    created = time.monotonic()

    async def gone():
        r = await query(nc, mail_id, token)
        return r if r.get("code") == "not_found" else None

    r = await wait_until(gone, timeout=3.0, step=0.1)
    assert r, await query(nc, mail_id, token)
    assert_error(r, "not_found")
    assert time.monotonic() - created <= 2.6  # "within about a second of its TTL passing"

    # its messages went with it: a subscriber gets nothing, a send is refused
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    await assert_nothing_more(sub, 0.3)
    assert_error(await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.normal", {"x": 1}),
                 "not_found")

    # while the ttl-0 mailbox created before it is still there
    assert (await query(nc, forever["mail_id"], forever["token"]))["unread"] == 0


async def test_delete_with_token(shared_node, connect):
    nc = await connect(shared_node.url)
    box = await create(nc, type="standard", ttl=3600)
    mail_id, token = box["mail_id"], box["token"]
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", b"x", timeout=T)

    assert_error(await request_json(nc, f"$mq9.AI.MAILBOX.DELETE.{mail_id}",
                                    {"token": "tok-nope"}), "auth")
    assert (await query(nc, mail_id, token))["unread"] == 1

    r = await request_json(nc, f"$mq9.AI.MAILBOX.DELETE.{mail_id}", {"token": token})
    assert "error" not in r, r
    assert_error(await query(nc, mail_id, token), "not_found")
    assert_error(await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.normal", {"x": 1}),
                 "not_found")
    assert_error(await request_json(nc, f"$mq9.AI.MAILBOX.DELETE.{mail_id}",
                                    {"token": token}), "not_found")


async def test_message_over_size_limit_is_rejected(node_factory, connect):
    limit = 1024
    node = node_factory(max_payload=limit)
    nc = await connect(node.url)
    assert nc.max_payload == limit  # the INFO line advertises the limit
    box = await create(nc, type="standard", ttl=3600)
    mail_id = box["mail_id"]

    # nats-py refuses before sending
    with pytest.raises(MaxPayloadError):
        await nc.publish(f"$mq9.AI.INBOX.{mail_id}.normal", b"x" * (limit + 1))
    # under the limit is fine
    ack = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.normal", b"y" * (limit - 100))
    assert ack.get("msg_id") is not None, ack

    # a client that does not check: the server answers -ERR and closes the connection
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", node.port), T)
    try:
        info = await asyncio.wait_for(reader.readline(), T)
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["max_payload"] == limit
        big = b"z" * (limit + 1)
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                     + f"PUB $mq9.AI.INBOX.{mail_id}.normal {len(big)}\r\n".encode()
                     + big + b"\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), T)
        while line.startswith((b"PING", b"PONG", b"+OK")):
            line = await asyncio.wait_for(reader.readline(), T)
        assert line == b"-ERR 'Maximum Payload Violation'\r\n", line
        try:  # then it closes the connection (a reset is a close too)
            await asyncio.wait_for(reader.read(), T)
        except ConnectionResetError:
            pass
    finally:
        writer.close()

    # nothing oversized was stored
    q = await query(nc, mail_id, box["token"])
    assert q["unread"] == 1 and len(q["messages"][0]["payload"]) == limit - 100, q


# ---- durability --------------------------------------------------------------------------


async def _send_acknowledged(nc, mail_id, n) -> list[int]:
    prios = ("urgent", "normal", "notify")
    ids = []
    for start in range(0, n, 50):
        acks = await asyncio.gather(*[
            nc.request(f"$mq9.AI.INBOX.{mail_id}.{prios[i % 3]}",
                       json.dumps({"seq": i}).encode(), timeout=T)
            for i in range(start, min(n, start + 50))
        ])
        for a in acks:
            d = json.loads(a.data)
            assert "msg_id" in d, d
            ids.append(d["msg_id"])
    return ids


async def test_messages_survive_a_restart(node, connect):
    nc = await connect(node.url)
    box = await create(nc, type="standard", ttl=3600)
    latest = await create(nc, type="latest", ttl=3600)
    mail_id, token = box["mail_id"], box["token"]
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", b"normal-1", timeout=T)
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.notify", b"notify-1", timeout=T)
    await nc.request(f"$mq9.AI.INBOX.{mail_id}.urgent", b"urgent-1", timeout=T)
    for v in ("v1", "v2", "v3"):
        await nc.request(f"$mq9.AI.INBOX.{latest['mail_id']}.normal", v.encode(), timeout=T)
    await nc.close()

    assert node.stop() == 0
    node.start()

    nc = await connect(node.url)
    assert (await query(nc, mail_id, token))["unread"] == 3  # the token survived too
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    assert [m.data for m in await drain(sub, 3)] == [b"urgent-1", b"normal-1", b"notify-1"]
    await assert_nothing_more(sub)
    q = await query(nc, latest["mail_id"], latest["token"])
    assert [m["payload"] for m in q["messages"]] == ["v3"], q
    # new sends continue the msg_id sequence
    ack = await request_json(nc, f"$mq9.AI.INBOX.{mail_id}.normal", {"after": "restart"})
    assert (await sub.next_msg(timeout=T)).data == b'{"after": "restart"}'
    assert ack["msg_id"] > 0


async def test_kill_9_loses_no_acknowledged_message(node, connect):
    nc = await connect(node.url)
    box = await create(nc, type="standard", ttl=3600)
    mail_id = box["mail_id"]
    n = 300
    ids = await _send_acknowledged(nc, mail_id, n)
    assert len(set(ids)) == n

    # kill -9 the whole node: every gateway and shard and the supervisor at once
    children = node.pids()
    assert children, "no child processes found"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    node.kill()
    assert node.wait_gone(children) == []
    node.start()

    nc = await connect(node.url)
    q = await query(nc, mail_id, box["token"], limit=1000)
    assert q["unread"] == n, {k: q.get(k) for k in ("unread", "error", "code")}
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    msgs = await drain(sub, n)
    seqs = [json.loads(m.data)["seq"] for m in msgs]
    assert sorted(seqs) == list(range(n))
    # urgent, then normal, then notify, oldest first within each
    assert seqs == ([i for i in range(n) if i % 3 == 0] + [i for i in range(n) if i % 3 == 1]
                    + [i for i in range(n) if i % 3 == 2])
    await assert_nothing_more(sub)
