"""Slot moves on the shard side: Export / Import / Freeze / Drop, on real RocksDBs."""

from __future__ import annotations

import hashlib

import pytest

from mq9 import wire
from mq9.cluster.slots import slot_of
from mq9.shard.mailbox_test import ALL, TOK, Clock, Rig, delivers
from mq9.shard.state import size_of, state_of
from mq9.shard.store import FAMILIES

MOVING = ["alpha", "beta.x", "gamma-7", "ttl-box", "last"]
STAYS = "stays"


def results(out, gw=b"g1"):
    return [r for r in out.get(gw, []) if isinstance(r, wire.ANSWERS)]


def call(rig: Rig, op, gw=b"g1") -> wire.Result:
    return results(rig.run(op, gw=gw), gw)[0]


def export_all(rig: Rig, slots, max_bytes=4 << 20) -> tuple[list, int]:
    pairs, after, pages = [], None, 0
    while True:
        res = call(rig, wire.Export(rig.next_rid(), slots, after, max_bytes), gw=b"mover")
        assert res.code is None, res
        pages += 1
        pairs += [tuple(p) for p in res.data["pairs"]]
        after = res.data["next"]
        if after is None:
            return pairs, pages


def import_all(rig: Rig, slots, pairs, page=7) -> wire.Result:
    chunks = [pairs[i:i + page] for i in range(0, len(pairs), page)] or [[]]
    for i, chunk in enumerate(chunks):
        res = call(rig, wire.Import(rig.next_rid(), slots, chunk, reset=i == 0,
                                    done=i == len(chunks) - 1), gw=b"mover")
        assert res.code is None, res
    return res


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pair(tmp_path, clock):
    a = Rig(tmp_path / "a", clock=clock)
    b = Rig(tmp_path / "b", clock=clock)
    yield a, b
    a.close()
    b.close()


def fill(a: Rig) -> list[int]:
    """Mailboxes of every kind in the moving slots, one in another slot."""
    for m in MOVING[:3]:
        assert a.create(m).code is None
    assert a.create("ttl-box", ttl=60).code is None
    assert a.create("last", type="latest").code is None
    assert a.create(STAYS).code is None
    for i, p in enumerate(["notify", "normal", "urgent"] * 4):
        a.send_ok(p, payload=b"p%d" % i, mail_id="alpha")
    a.send_ok("urgent", mail_id="beta.x")
    a.send_ok(mail_id="ttl-box")
    a.send_ok(mail_id="last")
    a.send_ok(mail_id="last", payload=b"newest")
    a.send_ok(mail_id=STAYS)
    # Deliver some of alpha: a subscriber gets the urgent ones, reports two of them.
    out = a.run(wire.Subscribe(1, "alpha", 1))
    got = [mid for mid, _ in delivers(out)]
    assert got == [3, 6, 9, 12]
    a.run(wire.Delivered(1, "alpha", [3, 6]), wire.Unsubscribe(1, "alpha"))
    return sorted({slot_of(m) for m in MOVING})


def test_export_import_round_trip(pair, clock):
    a, b = pair
    slots = fill(a)
    assert slot_of(STAYS) not in slots
    pairs, pages = export_all(a, slots)
    assert pages == 1
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert not any(b"stays" in k for k in keys)
    assert {k[:2] for k in keys} == set(FAMILIES)

    small, pages = export_all(a, slots, max_bytes=60)
    assert pages > 5 and small == pairs

    res = import_all(b, slots, pairs)
    assert res.data["mailboxes"] == len(MOVING)
    assert set(b.shard.mailboxes) == set(MOVING)
    # b now exports exactly what a did.
    assert export_all(b, slots)[0] == pairs

    for m in MOVING:
        qa, qb = a.query(m), b.query(m)
        assert qb.code is None and qa.data == qb.data
    assert b.query("alpha", token=hashlib.sha256(b"wrong").digest()).code == "auth"
    assert b.query(STAYS).code == "not_found"
    assert b.query("alpha").data["unread"] == 10  # 12 sent, 2 delivered
    assert b.shard.total_msgs == a.shard.total_msgs - 1
    ma, mb = a.shard.mailboxes["alpha"], b.shard.mailboxes["alpha"]
    assert {k: (size_of(v), state_of(v)) for k, v in mb.msgs.items()} == \
        {k: (size_of(v), state_of(v)) for k, v in ma.msgs.items()}
    assert sorted(mb.delivered) == [3, 6] and mb.nbytes == ma.nbytes

    # Replay in priority order, delivered ones skipped; ids continue after the copy.
    out = b.run(wire.Subscribe(5, "alpha", ALL))
    got = delivers(out)
    assert [m for m, _ in got] == [9, 12, 2, 5, 8, 11, 1, 4, 7, 10]
    assert b.send_ok(mail_id="alpha") == 13
    assert b.send_ok(mail_id="last") == 3
    q = b.query("last")
    assert [m["payload"] for m in q.data["messages"]] == ["x"]
    # TTL survives the move.
    assert b.shard.next_expiry() == clock.t + 60
    clock.t += 61
    b.run()
    assert "ttl-box" not in b.shard.mailboxes and b.query("ttl-box").code == "not_found"


def test_paging_resumes_in_every_family(pair):
    a, _ = pair
    a.create("alpha")
    a.create("beta.x")
    for _ in range(20):
        a.send_ok(mail_id="alpha", payload=b"x" * 30)
        a.send_ok(mail_id="beta.x", payload=b"y" * 30)
    slots = [slot_of("alpha"), slot_of("beta.x")]
    full, _ = export_all(a, slots)
    for mb in (1, 50, 100, 1000):
        got, _ = export_all(a, slots, max_bytes=mb)
        assert got == full
    # A page stays within max_bytes unless a single record is bigger.
    res = call(a, wire.Export(a.next_rid(), slots, None, 200), gw=b"mover")
    assert sum(len(k) + len(v) for k, v in res.data["pairs"]) <= 200


def test_export_sees_writes_of_the_same_batch(pair):
    a, _ = pair
    a.create("alpha")
    slots = [slot_of("alpha")]
    out = a.run(wire.Send(a.next_rid(), "alpha", "normal", "s", b"late"),
                wire.Export(a.next_rid(), slots, None, 1 << 20), gw=b"mover")
    exp = results(out, b"mover")[1]
    assert any(v.endswith(b"late") for k, v in exp.data["pairs"] if k[:2] == b"m\0")


def test_reset_on_repeated_import(pair):
    a, b = pair
    slots = fill(a)
    import_all(b, slots, export_all(a, slots)[0])
    # The source changes during the copy; the second copy replaces, never merges.
    a.run(wire.Delete(a.next_rid(), "beta.x", TOK))
    a.send_ok(mail_id="alpha", payload=b"more")
    a.run(wire.Delivered(1, "alpha", [9]))
    pairs = export_all(a, slots)[0]
    import_all(b, slots, pairs, page=3)
    assert export_all(b, slots)[0] == pairs
    assert "beta.x" not in b.shard.mailboxes
    assert b.query("alpha").data == a.query("alpha").data
    # A repeated page sequence that never sends done leaves nothing in memory until done.
    call(b, wire.Import(b.next_rid(), slots, pairs[:2], reset=True), gw=b"mover")
    assert not any(m in b.shard.mailboxes for m in MOVING)
    assert b.query("alpha").code == "moved"  # half-imported slots are not served
    import_all(b, slots, pairs)
    assert b.query("alpha").code is None
    assert b.shard.total_msgs == sum(len(m.msgs) for m in b.shard.mailboxes.values())


def test_freeze_moves_inflight_back_and_answers_moved(pair):
    a, b = pair
    slots = fill(a)
    out = a.run(wire.Subscribe(2, "alpha", ALL), wire.Subscribe(3, STAYS, ALL))
    assert len(delivers(out)) == 11  # 10 undelivered of alpha + stays
    res = call(a, wire.Freeze(a.next_rid(), slots), gw=b"mover")
    assert res.code is None and res.data["mailboxes"] == len(MOVING)
    mb = a.shard.mailboxes["alpha"]
    assert not mb.inflight and mb.undelivered == 10
    assert not a.shard.subs[b"g1"][2].inflight
    for op in (wire.Create(a.next_rid(), "beta.x", "standard", 0, TOK),
               wire.Send(a.next_rid(), "alpha", "normal", "s", b"p"),
               wire.Query(a.next_rid(), "alpha", TOK),
               wire.Delete(a.next_rid(), "alpha", TOK)):
        r = call(a, op)
        assert (r.code, r.error) == ("moved", "mailbox is moving; retry")
    # A new mailbox in a frozen slot is refused too; other slots are served as before.
    assert call(a, wire.Send(a.next_rid(), "gamma-7", "normal", "s", b"p")).code == "moved"
    assert a.send_ok(mail_id=STAYS) == 2
    # Frozen mailboxes are not pumped; a late Delivered report still counts.
    out = a.run(wire.Subscribe(4, "beta.x", ALL), wire.Delivered(2, "alpha", [9]))
    assert delivers(out) == []
    pairs = export_all(a, slots)[0]
    marks = {(k[2:-11], int.from_bytes(k[-8:], "big")) for k, _ in pairs if k[:2] == b"u\0"}
    assert {m for n, m in marks if n == b"alpha"} == {12, 1, 2, 4, 5, 7, 8, 10, 11}
    import_all(b, slots, pairs)
    assert b.query("alpha").data["unread"] == 9

    # Drop: data gone from disk and memory, still "moved".
    before = a.shard.total_msgs
    res = call(a, wire.Drop(a.next_rid(), slots), gw=b"mover")
    assert res.code is None and res.data["dropped"] == len(MOVING)
    assert not any(m in a.shard.mailboxes for m in MOVING)
    assert a.shard.total_msgs == before - sum(len(b.shard.mailboxes[m].msgs) for m in MOVING)
    assert export_all(a, slots)[0] == []
    assert all(a.store.db.get(k) is None for k, _ in pairs)
    assert a.query("alpha").code == "moved"
    assert call(a, wire.Create(a.next_rid(), "alpha", "standard", 0, TOK)).code == "moved"

    # Frozen survives a restart.
    a.reopen()
    assert a.query("alpha").code == "moved"
    assert a.query(STAYS).code is None

    # Moving the slots back imports and unfreezes them.
    back = export_all(b, slots)[0]
    import_all(a, slots, back)
    assert a.query("alpha").data == b.query("alpha").data
    a.reopen()
    assert a.query("alpha").code is None


def test_early_subscription_on_target_gets_pumped_after_import(pair):
    a, b = pair
    slots = fill(a)
    pairs = export_all(a, slots)[0]
    out = b.run(wire.Subscribe(9, "alpha", ALL), gw=b"gw2")
    assert delivers(out, b"gw2") == []
    out = b.run(wire.Import(b.next_rid(), slots, pairs, reset=True, done=True), gw=b"mover")
    assert [m for m, _ in delivers(out, b"gw2")] == [9, 12, 2, 5, 8, 11, 1, 4, 7, 10]
    out = b.run(wire.Send(b.next_rid(), "alpha", "urgent", "s", b"live"))
    assert delivers(out, b"gw2") == [(13, "urgent")]


def test_nonsense_is_bad_request_and_changes_nothing(pair):
    a, b = pair
    slots = fill(a)
    pairs = export_all(a, slots)[0]
    bad = [
        wire.Export(1, [], None, 100),
        wire.Export(2, [4096], None, 100),
        wire.Export(3, [-1], None, 100),
        wire.Export(4, slots, b"zz", 100),
        wire.Export(5, slots, None, 0),
        wire.Export(6, [slot_of("alpha")], b"M\0" + STAYS.encode(), 100),
        wire.Freeze(7, []),
        wire.Drop(8, [99999]),
        wire.Import(9, [slot_of("alpha")], [(b"M\0" + STAYS.encode(), pairs[0][1])]),
        wire.Import(10, slots, [(b"M\0alpha", b"not msgpack meta")]),
        wire.Import(11, slots, [(b"m\0alpha\0short", b"")]),
        wire.Import(12, slots, [(b"X\0alpha", b"")]),
    ]
    out = b.run(*bad, gw=b"mover")[b"mover"]
    assert [r.code for r in out] == ["bad_request"] * len(bad)
    assert not b.shard.frozen and not b.shard.mailboxes
    assert len(b.store.db.get(b"F\0") or b"") == 0


def test_empty_done_import_unfreezes_source_after_failed_flip(pair):
    """The mover's abort: the source gets its slots back, data and subscriptions intact."""
    a, _ = pair
    slots = fill(a)
    a.run(wire.Subscribe(2, "alpha", ALL))
    call(a, wire.Freeze(a.next_rid(), slots), gw=b"mover")
    assert a.query("alpha").code == "moved"
    out = a.run(wire.Import(a.next_rid(), slots, [], done=True), gw=b"mover")
    assert results(out, b"mover")[0].code is None
    assert [m for m, _ in delivers(out)] == [9, 12, 2, 5, 8, 11, 1, 4, 7, 10]
    assert a.query("alpha").data["unread"] == 10
    assert a.send_ok(mail_id="alpha") == 13
    assert not a.shard.frozen
