"""The operator's list on the shard side (ListMailboxes -> MailboxList), on a real RocksDB."""

from __future__ import annotations

import pytest

from mq9 import wire
from mq9.cluster.slots import slot_of
from mq9.shard import listing as listing_mod
from mq9.shard.mailbox_test import ALL, TOK, Rig

PAYLOAD = b"payload-secret-7f3a"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "db")
    yield r
    r.close()


def listing(rig: Rig, prefix="", after="", limit=100, gw=b"op"):
    out = rig.run(wire.ListMailboxes(rig.next_rid(), prefix, after, limit), gw=gw)
    (res,) = out[gw]
    return res


def list_all(rig: Rig, prefix="", limit=100) -> tuple[list[wire.MailboxInfo], int]:
    items, after, pages = [], "", 0
    while True:
        res = listing(rig, prefix, after, limit)
        assert type(res) is wire.MailboxList, res
        pages += 1
        items += res.items
        if not res.more:
            return items, pages
        assert res.last and res.last > after
        after = res.last


def test_counts_bytes_and_times(rig):
    rig.create("b.box", ttl=600)
    rig.create("a.box", type="latest")
    rig.create("c.empty")
    for prio, n in (("urgent", 1), ("normal", 2), ("notify", 3)):
        for _ in range(n):
            rig.send_ok(prio, PAYLOAD, mail_id="b.box")
    rig.send_ok("normal", b"12345", mail_id="a.box")
    rig.send_ok("urgent", b"123", mail_id="a.box")  # latest: replaces the first
    rig.run(wire.Subscribe(1, "b.box", ALL), gw=b"g2")

    res = listing(rig)
    assert type(res) is wire.MailboxList and res.more is False and res.total == 3
    assert [i.mail_id for i in res.items] == ["a.box", "b.box", "c.empty"]
    a, b, c = res.items
    assert (a.type, a.unread, a.messages, a.bytes, a.ttl, a.expires_at) == ("latest", (1, 0, 0), 1, 3, 0, 0)
    # The subscriber on g2 got all six pushed: in flight still counts as unread.
    assert (b.unread, b.messages, b.bytes, b.subscribers) == ((1, 2, 3), 6, 6 * len(PAYLOAD), 1)
    assert b.created == rig.clock.t and b.expires_at == rig.clock.t + 600 and b.ttl == 600
    assert (c.unread, c.messages, c.bytes, c.subscribers) == ((0, 0, 0), 0, 0, 0)

    # Delivered messages stay stored but are no longer unread.
    rig.run(wire.Delivered(1, "b.box", [1, 2, 4]), gw=b"g2")
    b = listing(rig, prefix="b.")
    assert b.items[0].unread == (0, 1, 2) and b.items[0].messages == 6
    assert b.total is None  # not counted under a prefix


def test_no_token_hash_or_payload_on_the_wire(rig):
    rig.create("box")
    rig.send_ok("notify", PAYLOAD)
    frame = wire.encode([listing(rig)])
    assert TOK not in frame and PAYLOAD not in frame
    assert b"box" in frame


def test_prefix_filter_and_cursor(rig):
    names = ["team.a.1", "team.a.2", "team.b.1", "team", "teams.x", "other", "tea"]
    for n in names:
        rig.create(n)
    assert [i.mail_id for i in listing(rig, prefix="team.a.").items] == ["team.a.1", "team.a.2"]
    assert [i.mail_id for i in listing(rig, prefix="team").items] == [
        "team", "team.a.1", "team.a.2", "team.b.1", "teams.x"]
    assert [i.mail_id for i in listing(rig, prefix="team.", after="team.a.2").items] == ["team.b.1"]
    assert listing(rig, prefix="zzz").items == []
    # A cursor below the prefix starts at the prefix; one past it ends the list.
    assert [i.mail_id for i in listing(rig, prefix="team.b", after="a").items] == ["team.b.1"]
    assert listing(rig, prefix="team.a", after="team.b").items == []


def test_paging_gives_every_mailbox_once(rig):
    names = [f"m{i:03d}" for i in range(23)]
    for n in names:
        rig.create(n)
    items, pages = list_all(rig, limit=5)
    assert [i.mail_id for i in items] == names
    assert pages == 5  # the last page knows it is the last: no empty page after it
    res = listing(rig, limit=5, after="m019")
    assert [i.mail_id for i in res.items] == ["m020", "m021", "m022"] and not res.more


def test_work_bound_stops_a_page_early(rig, monkeypatch):
    for i in range(10):
        rig.create(f"w{i}")
        for _ in range(3):
            rig.send_ok(mail_id=f"w{i}")
    monkeypatch.setattr(listing_mod, "LIST_COUNT", 7)
    res = listing(rig, limit=100)
    assert res.more and len(res.items) == 3 and res.last == "w2"
    items, _ = list_all(rig, limit=100)
    assert [i.mail_id for i in items] == [f"w{i}" for i in range(10)]
    monkeypatch.setattr(listing_mod, "LIST_SCAN", 4)
    items, pages = list_all(rig, limit=100)
    assert len(items) == 10 and pages >= 3


def test_expired_deleted_and_frozen_are_left_out(rig):
    rig.create("keep")
    rig.create("short", ttl=5)
    rig.create("gone")
    rig.run(wire.Delete(rig.next_rid(), "gone", TOK))
    assert [i.mail_id for i in listing(rig).items] == ["keep", "short"]
    rig.clock.t += 5  # due: left out even before the expiry tick removes it
    rig.shard.begin()
    rig.shard.apply(b"op", wire.ListMailboxes(rig.next_rid()))
    res = rig.shard.finish()[b"op"][0]
    assert [i.mail_id for i in res.items] == ["keep"] and "short" in rig.shard.mailboxes
    # A slot given away (frozen) is served elsewhere: not listed here, not counted.
    rig.run(wire.Freeze(rig.next_rid(), [slot_of("keep")]), gw=b"mover")
    res = listing(rig)
    assert res.items == [] and res.total == 0
    # After a restart the list comes from what was stored.
    rig.run(wire.Import(rig.next_rid(), [slot_of("keep")], [], done=True), gw=b"mover")
    rig.reopen()
    assert [i.mail_id for i in listing(rig).items] == ["keep"]


@pytest.mark.parametrize("op", [
    wire.ListMailboxes(1, limit=0),
    wire.ListMailboxes(1, limit=listing_mod.LIST_MAX + 1),
    wire.ListMailboxes(1, prefix="a b"),
    wire.ListMailboxes(1, after="x*"),
    wire.ListMailboxes(1, prefix="p" * 129),
])
def test_bad_requests(rig, op):
    res = rig.run(op, gw=b"op")[b"op"][0]
    assert type(res) is wire.Result and res.code == "bad_request" and res.error


def test_served_while_storage_fails(rig):
    rig.create("box")
    rig.shard.storage_error = "disk full"
    assert [i.mail_id for i in listing(rig).items] == ["box"]
