"""Mailbox state and delivery logic, driven batch by batch on a real RocksDB."""

from __future__ import annotations

import base64
import hashlib
from typing import NamedTuple

import pytest

from mq9 import subjects, wire
from mq9.shard import store as store_mod
from mq9.shard.batch import Shard
from mq9.shard.store import Store

TOK = hashlib.sha256(b"tok-secret").digest()
ALL = subjects.ALL_PRIORITIES
BIT = subjects.PRIORITY_BIT


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    """One shard over a RocksDB in ``path``; ``run`` is one batch."""

    def __init__(self, path, clock=None, **kw):
        self.path = str(path)
        self.clock = clock or Clock()
        self.kw = kw
        self.rid = 0
        self._open()

    def _open(self):
        self.store = Store(self.path)
        self.shard = Shard(self.store, clock=self.clock, **self.kw)
        self.shard.load()

    def reopen(self):
        self.store.close()
        self._open()

    def close(self):
        self.store.close()

    def run(self, *ops, gw=b"g1") -> dict:
        self.shard.begin()
        for op in ops:
            if isinstance(op, tuple):
                self.shard.apply(op[0], op[1])
            else:
                self.shard.apply(gw, op)
        self.shard.expire()
        return self.shard.finish()

    def next_rid(self):
        self.rid += 1
        return self.rid

    def create(self, mail_id="box", type="standard", ttl=0):
        res = self.run(wire.Create(self.next_rid(), mail_id, type, ttl, TOK))[b"g1"][0]
        return res

    def send(self, prio="normal", payload=b"x", mail_id="box", gw=b"g1"):
        out = self.run(wire.Send(self.next_rid(), mail_id, prio, f"$mq9.AI.INBOX.{mail_id}.{prio}", payload),
                       gw=gw)
        return out

    def send_ok(self, *args, **kw) -> int:
        out = self.send(*args, **kw)
        gw = kw.get("gw", b"g1")
        res = [r for r in out[gw] if isinstance(r, wire.ANSWERS)][0]
        assert res.code is None, res
        return res.data["msg_id"]

    def query(self, mail_id="box", token=TOK, limit=100, mark_read=False) -> wire.Result:
        out = self.run(wire.Query(self.next_rid(), mail_id, token, limit, mark_read))
        return out[b"g1"][0]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "db", window=1000, max_msgs=10000)
    yield r
    r.close()


class Pushed(NamedTuple):
    """One message of a DeliverRun, for assertions."""
    key: int
    mail_id: str
    msg_id: int
    priority: str
    subject: str
    payload: bytes
    headers: bytes | None


def pushed(items) -> list[Pushed]:
    """Every message pushed in ``items`` (a shard's output for one gateway), in order."""
    out = []
    for d in items:
        if type(d) is wire.DeliverRun:
            hs = d.headers or [None] * len(d.msg_ids)
            out.extend(Pushed(d.key, d.mail_id, mid, d.priority, d.subject, p, h)
                       for mid, p, h in zip(d.msg_ids, d.payloads, hs))
    return out


def delivers(out, gw=b"g1", key=None):
    return [(d.msg_id, d.priority) for d in pushed(out.get(gw, []))
            if key is None or d.key == key]


# ---- create / send basics ----------------------------------------------------------------

def test_create_and_exists(rig):
    res = rig.create("a.b-c_d", ttl=0)
    assert res.code is None
    assert res.data == {"mail_id": "a.b-c_d", "type": "standard", "ttl": 0, "expires_at": 0}
    res = rig.create("a.b-c_d")
    assert res.code == "exists" and res.error
    assert rig.create("x", type="bogus").code == "bad_request"
    assert rig.create("bad..id").code == "bad_request"
    res = rig.create("ttl", ttl=60)
    assert res.data["expires_at"] == int(rig.clock.t) + 60


def test_send_errors_and_ids(rig):
    out = rig.send(mail_id="nope")
    assert out[b"g1"][0].code == "not_found"
    rig.create()
    out = rig.send(prio="high")
    assert out[b"g1"][0].code == "bad_request"
    ids = [rig.send_ok() for _ in range(3)]
    assert ids == [1, 2, 3]
    res = rig.send(prio="urgent")[b"g1"][0]
    assert res.data == {"mail_id": "box", "msg_id": 4, "priority": "urgent"}


# ---- delivery order, priorities --------------------------------------------------------

def test_replay_order_urgent_normal_notify(rig):
    rig.create()
    prios = ["notify", "normal", "urgent", "normal", "notify", "urgent"]
    for p in prios:
        rig.send_ok(p)
    out = rig.run(wire.Subscribe(1, "box", ALL))
    assert delivers(out) == [(3, "urgent"), (6, "urgent"), (2, "normal"), (4, "normal"),
                             (1, "notify"), (5, "notify")]
    d = pushed(out[b"g1"])[0]
    assert d.subject == "$mq9.AI.INBOX.box.urgent" and d.payload == b"x" and d.key == 1
    # Live messages follow at once.
    out = rig.send("normal")
    assert delivers(out) == [(7, "normal")]


def test_priority_mask(rig):
    rig.create()
    rig.send_ok("normal")
    rig.send_ok("urgent")
    out = rig.run(wire.Subscribe(1, "box", BIT["urgent"]))
    assert delivers(out) == [(2, "urgent")]
    assert delivers(rig.send("notify")) == []
    out = rig.run(wire.Subscribe(2, "box", BIT["normal"] | BIT["notify"]))
    assert delivers(out, key=2) == [(1, "normal"), (3, "notify")]


def test_headers_kept(rig):
    rig.create()
    rig.run(wire.Send(rig.next_rid(), "box", "normal", "$mq9.AI.INBOX.box.normal", b"p",
                      b"NATS/1.0\r\nX-A: 1\r\n\r\n"))
    rig.reopen()
    out = rig.run(wire.Subscribe(1, "box", ALL))
    d = pushed(out[b"g1"])[0]
    assert d.headers == b"NATS/1.0\r\nX-A: 1\r\n\r\n" and d.payload == b"p"


# ---- queue groups, multiple subscribers, no duplicates --------------------------------------

def test_queue_group_one_member_each(rig):
    rig.create()
    rig.run(wire.Subscribe(1, "box", ALL, "workers"), (b"g2", wire.Subscribe(2, "box", ALL, "workers")),
            wire.Subscribe(3, "box", ALL))  # plain: sees everything
    got = {1: [], 2: [], 3: []}
    for _ in range(10):
        out = rig.send()
        for gw in (b"g1", b"g2"):
            for d in pushed(out.get(gw, [])):
                got[d.key].append(d.msg_id)
    assert sorted(got[1] + got[2]) == list(range(1, 11))
    assert len(got[1]) == len(got[2]) == 5
    assert got[3] == list(range(1, 11))


def test_second_subscriber_gets_no_inflight_duplicates(rig):
    rig.create()
    for _ in range(3):
        rig.send_ok()
    assert [m for m, _ in delivers(rig.run(wire.Subscribe(1, "box", ALL)))] == [1, 2, 3]
    out = rig.run((b"g2", wire.Subscribe(7, "box", ALL)))
    assert delivers(out, gw=b"g2") == []
    out = rig.send()
    assert delivers(out, key=1) == [(4, "normal")]
    assert delivers(out, gw=b"g2") == [(4, "normal")]


def test_unsubscribe_requeues_only_messages_held_by_nobody_else(rig):
    rig.create()
    for _ in range(5):
        rig.send_ok()
    rig.run(wire.Subscribe(1, "box", ALL))  # 1..5 in flight to key 1
    rig.run(wire.Delivered(1, "box", [1, 2]))
    out = rig.run(wire.Unsubscribe(1, "box"), (b"g2", wire.Subscribe(9, "box", ALL)))
    assert [m for m, _ in delivers(out, gw=b"g2")] == [3, 4, 5]
    # 6 goes to key 9 and to a new plain sub 10; 9 leaving must not requeue 6.
    rig.run(wire.Subscribe(10, "box", ALL))
    out = rig.send()
    assert delivers(out, key=10) == [(6, "normal")]
    out = rig.run((b"g2", wire.Unsubscribe(9, "box")))
    # 3, 4, 5 were held by 9 alone: they go to 10, in order; 6 stays with 10, not resent.
    assert [m for m, _ in delivers(out, key=10)] == [3, 4, 5]
    assert rig.query().data["unread"] == 4


def test_undelivered_and_hello_requeue_in_order(rig):
    rig.create()
    for p in ["normal", "urgent", "normal", "notify"]:
        rig.send_ok(p)
    out = rig.run(wire.Subscribe(1, "box", ALL))
    assert [m for m, _ in delivers(out)] == [2, 1, 3, 4]
    # The gateway could not write 1 and 4; they go back and are pushed again, in order.
    out = rig.run(wire.Undelivered(1, "box", [4, 1]))
    assert [m for m, _ in delivers(out)] == [1, 4]
    # Undelivered for a message not in flight to that key is ignored.
    assert delivers(rig.run(wire.Undelivered(1, "box", [99]))) == []
    # Gateway g1 restarts: everything in flight to it returns; g2 gets it all, in order.
    rig.run((b"g2", wire.Subscribe(5, "box", ALL, "q")))
    out = rig.run(wire.Hello())
    assert [m for m, _ in delivers(out, gw=b"g2")] == [2, 1, 3, 4]
    assert rig.shard.subs.get(b"g1") is None


def test_gateway_unreachable_drops_its_subs(rig):
    rig.create()
    rig.send_ok()
    out = rig.run(wire.Subscribe(1, "box", ALL), (b"g2", wire.Subscribe(2, "box", ALL, "q")))
    assert delivers(out) == delivers(out, gw=b"g2") == [(1, "normal")]
    rig.shard.drop_gateway(b"g2")
    assert delivers(rig.run()) == []  # still in flight to g1: not requeued
    rig.shard.drop_gateway(b"g1")
    assert rig.shard.mailboxes["box"].inflight == {}
    out = rig.run((b"g3", wire.Subscribe(3, "box", ALL)))
    assert delivers(out, gw=b"g3") == [(1, "normal")]


def test_window(tmp_path):
    r = Rig(tmp_path / "db", window=3)
    try:
        r.create()
        for _ in range(10):
            r.send_ok()
        out = r.run(wire.Subscribe(1, "box", ALL))
        assert [m for m, _ in delivers(out)] == [1, 2, 3]
        assert delivers(r.send()) == []
        out = r.run(wire.Delivered(1, "box", [1, 2]))
        assert [m for m, _ in delivers(out)] == [4, 5]
        out = r.run(wire.Delivered(1, "box", [3, 4, 5]))
        assert [m for m, _ in delivers(out)] == [6, 7, 8]
    finally:
        r.close()


# ---- max_msgs, latest ----------------------------------------------------------------------

def test_eviction_oldest_delivered_first_then_full(tmp_path):
    r = Rig(tmp_path / "db", max_msgs=3)
    try:
        r.create()
        for _ in range(3):
            r.send_ok()
        res = r.send()[b"g1"][0]
        assert res.code == "full" and res.error
        r.run(wire.Subscribe(1, "box", ALL))
        r.run(wire.Delivered(1, "box", [3, 1]))
        assert r.send_ok() == 4  # evicts 1
        assert sorted(r.shard.mailboxes["box"].msgs) == [2, 3, 4]
        assert r.send_ok() == 5  # evicts 3
        assert sorted(r.shard.mailboxes["box"].msgs) == [2, 4, 5]
        assert r.send()[b"g1"][0].code == "full"
        r.reopen()
        assert sorted(r.shard.mailboxes["box"].msgs) == [2, 4, 5]
        assert r.shard.total_msgs == 3
    finally:
        r.close()


def test_latest_keeps_one(rig):
    rig.create(type="latest")
    for i in range(3):
        rig.send_ok(payload=b"v%d" % i)
    q = rig.query().data
    assert q["unread"] == 1 and [(m["msg_id"], m["payload"]) for m in q["messages"]] == [(3, "v2")]
    out = rig.run(wire.Subscribe(1, "box", ALL))
    assert delivers(out) == [(3, "normal")]
    # Replaced while in flight: the late ack for 3 is harmless, 4 is pushed.
    out = rig.send(payload=b"v3")
    assert delivers(out) == [(4, "normal")]
    rig.run(wire.Delivered(1, "box", [3]))
    assert rig.query().data["unread"] == 1
    assert len(rig.shard.mailboxes["box"].msgs) == 1
    rig.reopen()
    assert list(rig.shard.mailboxes["box"].msgs) == [4]
    assert rig.send_ok() == 5  # ids are never reused across restarts


def test_latest_without_subscriber_does_not_grow(rig):
    rig.create(type="latest")
    for _ in range(500):
        rig.send_ok()
    mb = rig.shard.mailboxes["box"]
    assert sum(map(len, mb.pending)) == 1


# ---- query, delete ------------------------------------------------------------------------

def test_query(rig):
    assert rig.query().code == "not_found"
    rig.create()
    rig.send_ok("notify", b"n")
    rig.send_ok("urgent", b"\xff\xfe")
    rig.send_ok("normal", "héllo".encode())
    assert rig.query(token=hashlib.sha256(b"wrong").digest()).code == "auth"
    assert rig.query(token=b"").code == "auth"
    assert rig.query(limit=0).code == "bad_request"
    assert rig.query(limit=1001).code == "bad_request"
    q = rig.query(limit=2).data
    assert q["mail_id"] == "box" and q["unread"] == 3
    assert q["messages"][0] == {"msg_id": 2, "priority": "urgent", "subject": "$mq9.AI.INBOX.box.urgent",
                                "ts": int(rig.clock.t * 1000),
                                "payload": base64.b64encode(b"\xff\xfe").decode(), "encoding": "base64"}
    assert q["messages"][1]["payload"] == "héllo"
    q = rig.query(mark_read=True, limit=2).data
    assert [m["msg_id"] for m in q["messages"]] == [2, 3] and q["unread"] == 1
    q = rig.query().data
    assert [m["msg_id"] for m in q["messages"]] == [1]
    # Marked read: a subscriber is not given them again.
    out = rig.run(wire.Subscribe(1, "box", ALL))
    assert delivers(out) == [(1, "notify")]
    # In-flight messages are still unread for Query.
    assert rig.query().data["unread"] == 1


def test_query_read_marks_survive_restart_and_compact(rig):
    rig.create()
    for _ in range(300):
        rig.send_ok()
    rig.query(limit=250, mark_read=True)
    mb = rig.shard.mailboxes["box"]
    assert sum(map(len, mb.pending)) <= 2 * mb.undelivered + 64
    rig.reopen()
    q = rig.query(limit=1000).data
    assert q["unread"] == 50 and q["messages"][0]["msg_id"] == 251


def test_delete(rig):
    rig.create()
    rig.send_ok()
    rig.run(wire.Subscribe(1, "box", ALL))
    out = rig.run(wire.Delete(rig.next_rid(), "box", hashlib.sha256(b"no").digest()))
    assert out[b"g1"][0].code == "auth"
    out = rig.run(wire.Delete(rig.next_rid(), "box", TOK))
    assert out[b"g1"][0].code is None
    assert rig.send()[b"g1"][0].code == "not_found"
    assert rig.query().code == "not_found"
    assert rig.shard.total_msgs == 0
    # Recreated under the same name: the still-registered subscription sees the new one.
    rig.create()
    out = rig.send()
    assert delivers(out) == [(1, "normal")]
    rig.reopen()
    assert list(rig.shard.mailboxes["box"].msgs) == [1]


# ---- TTL, persistence ----------------------------------------------------------------------

def test_ttl_expiry_and_while_down(tmp_path):
    clock = Clock()
    r = Rig(tmp_path / "db", clock=clock)
    try:
        r.create("short", ttl=5)
        r.create("long", ttl=100)
        r.create("down", ttl=20)
        r.send_ok(mail_id="short")
        r.send_ok(mail_id="down")
        r.run(wire.Subscribe(1, "short", ALL))
        clock.t += 5.01
        out = r.run()
        assert "short" not in r.shard.mailboxes and r.shard.next_expiry() is not None
        assert delivers(out) == []
        assert r.send(mail_id="short")[b"g1"][0].code == "not_found"
        r.store.close()
        clock.t += 20
        r._open()
        assert sorted(r.shard.mailboxes) == ["long"]
        assert not list(r.store.db.keys(from_key=b"m\0"))
        assert r.create("down").code is None  # the name is free again
    finally:
        r.close()


def test_expired_but_not_yet_reaped_is_not_found(tmp_path):
    clock = Clock()
    r = Rig(tmp_path / "db", clock=clock)
    try:
        r.create("b", ttl=1)
        clock.t += 1.5
        r.shard.begin()
        r.shard.apply(b"g1", wire.Send(1, "b", "normal", "s", b"x"))
        out = r.shard.finish()
        assert out[b"g1"][0].code == "not_found"
    finally:
        r.close()


def test_restart_restores_pending_in_order_and_ids(rig):
    rig.create()
    for p in ["normal", "notify", "urgent", "normal", "urgent"]:
        rig.send_ok(p)
    rig.run(wire.Subscribe(1, "box", ALL))
    rig.run(wire.Delivered(1, "box", [3]))  # 5, 1, 4, 2 were in flight, never acked
    rig.reopen()
    out = rig.run(wire.Subscribe(1, "box", ALL))
    assert [m for m, _ in delivers(out)] == [5, 1, 4, 2]
    assert rig.send_ok() == 6
    assert rig.shard.total_msgs == 6 and rig.shard.total_bytes == 6


# ---- robustness ---------------------------------------------------------------------------

def test_exception_in_op_becomes_internal(rig, monkeypatch):
    rig.create()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(rig.store, "put_message_at", boom)
    out = rig.send()
    assert out[b"g1"][0].code == "internal"
    monkeypatch.undo()
    assert rig.send_ok() == 2  # the shard keeps working


def test_sub_before_create(rig):
    rig.run(wire.Subscribe(1, "later", ALL))
    rig.create("later")
    assert delivers(rig.send(mail_id="later")) == [(1, "normal")]


def test_key_layout_is_documented_one(rig):
    rig.create()
    rig.send_ok("urgent")
    keys = set(rig.store.db.keys())
    assert store_mod.meta_key("box") in keys
    assert b"m\0box\0" + (1).to_bytes(8, "big") in keys
    assert b"u\0box\0\0\0" + (1).to_bytes(8, "big") in keys


def test_pump_and_query_byte_budgets(rig, monkeypatch):
    from mq9.shard import ops, pump

    monkeypatch.setattr(pump, "PUMP_BYTES", 10)
    monkeypatch.setattr(ops, "QUERY_BYTES", 10)
    rig.create()
    for _ in range(5):
        rig.send_ok(payload=b"abcd")
    q = rig.query(mark_read=False).data
    assert [m["msg_id"] for m in q["messages"]] == [1, 2] and q["unread"] == 5
    first = [m for m, _ in delivers(rig.run(wire.Subscribe(1, "box", ALL)))]
    assert first == [1, 2, 3]
    assert rig.shard.dirty  # the server loop comes back at once for the rest
    assert [m for m, _ in delivers(rig.run())] == [4, 5]


def test_unreadable_metadata_is_left_alone(rig):
    rig.create("ok")
    rig.send_ok(mail_id="ok")
    rig.store.db[b"M\0weird"] = b"\xc1not msgpack"
    rig.store.db[b"m\0weird\0" + (1).to_bytes(8, "big")] = b"\0\0\0\0"
    rig.store.db[b"m\0ghost\0" + (1).to_bytes(8, "big")] = b"\0\0\0\0"  # no mailbox at all
    rig.reopen()
    assert sorted(rig.shard.mailboxes) == ["ok"]
    keys = set(rig.store.db.keys())
    assert b"M\0weird" in keys and b"m\0weird\0" + (1).to_bytes(8, "big") in keys
    assert b"m\0ghost\0" + (1).to_bytes(8, "big") not in keys


# ---- re-registration and storage failures ------------------------------------------------

def test_identical_resubscribe_keeps_what_is_in_flight(rig):
    """A gateway re-sends its subscriptions after a reconnect; if the shard still has them,
    nothing may be pushed twice. A changed subscription under the same key is replaced."""
    rig.create()
    for _ in range(3):
        rig.send_ok()
    assert delivers(rig.run(wire.Subscribe(1, "box", ALL))) == [(1, "normal"), (2, "normal"), (3, "normal")]
    assert delivers(rig.run(wire.Subscribe(1, "box", ALL))) == []
    out = rig.run(wire.Subscribe(1, "box", BIT["normal"]))
    assert delivers(out) == [(1, "normal"), (2, "normal"), (3, "normal")]


def test_failed_write_reload_keeps_subscriptions_and_disk_truth(rig):
    """What the server loop does when a batch's write fails: error replies, memory rebuilt
    from RocksDB (the failed batch's send never happened), subscriptions kept; while
    ``storage_error`` is set, sends are refused and queries still answered."""
    rig.create()
    rig.send_ok()
    rig.send_ok()
    rig.run(wire.Subscribe(7, "box", ALL))  # both in flight to key 7
    shard = rig.shard
    shard.begin()
    shard.apply(b"g1", wire.Send(rig.next_rid(), "box", "urgent", "$mq9.AI.INBOX.box.urgent", b"lost"))
    errs = shard.failed_outputs()  # instead of finish(): the write "failed"
    assert [(r.code, "storage" in r.error) for r in errs[b"g1"]] == [("unavailable", True)]
    shard.storage_error = "disk full"
    shard.reload()
    assert shard.mailboxes["box"].undelivered == 2 and shard.total_msgs == 2
    out = rig.run()  # the kept subscription gets its (re-pending) messages again
    assert delivers(out, key=7) == [(1, "normal"), (2, "normal")]
    res = rig.send()[b"g1"][0]
    assert res.code == "unavailable", res
    assert rig.create("other").code == "unavailable"
    q = rig.query()
    assert q.code is None and q.data["unread"] == 2
    shard.storage_error = None
    assert rig.send_ok("urgent") == 3  # the refused and the failed sends used no msg_id
