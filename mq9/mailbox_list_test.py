"""Merging the shards' pages of the operator's list, and reading its query."""

from __future__ import annotations

import pytest

from mq9 import wire
from mq9.mailbox_list import BadQuery, merge, parse


def info(mail_id: str) -> wire.MailboxInfo:
    return wire.MailboxInfo(mail_id, "standard", 0.0, 0.0, 0, (0, 0, 0), 0, 0, 0)


def page(names: list[str], more: bool, last: str | None = None) -> wire.MailboxList:
    return wire.MailboxList(0, [info(n) for n in names], more, last or (names[-1] if names else None))


def ids(items) -> list[str]:
    return [i.mail_id for _, i in items]


def test_full_pages_merge_in_order():
    a = ("n", 0), page(["a", "c", "e"], more=True)
    b = ("n", 1), page(["b", "d"], more=False)
    items, nxt = merge([a, b], limit=3)
    assert ids(items) == ["a", "b", "c"] and nxt == "c"
    assert [o for o, _ in items] == [("n", 0), ("n", 1), ("n", 0)]


def test_a_shard_that_stopped_early_bounds_the_page():
    # Shard 0 stopped after looking at "c" (its work bound), with more to come: shard 1's
    # "d" and "x" must wait, or whatever shard 0 has between "c" and "x" would be skipped.
    a = ("n", 0), page(["a"], more=True, last="c")
    b = ("n", 1), page(["b", "d", "x"], more=False)
    items, nxt = merge([a, b], limit=10)
    assert ids(items) == ["a", "b"] and nxt == "c"


def test_last_page_has_no_cursor():
    items, nxt = merge([(("n", 0), page(["a"], more=False)), (("n", 1), page([], more=False))], 5)
    assert ids(items) == ["a"] and nxt is None
    assert merge([], 5) == ([], None)


def test_a_mailbox_two_shards_report_goes_out_once():
    a = ("n1", 0), page(["a", "m"], more=False)
    b = ("n2", 0), page(["m", "z"], more=False)
    items, nxt = merge([a, b], limit=2)
    assert ids(items) == ["a", "m"] and nxt == "m"
    items, nxt = merge([a, b], limit=3)
    assert ids(items) == ["a", "m", "z"] and nxt is None


def test_parse():
    assert parse({}) == ("", "", 100)
    assert parse({"prefix": "team.", "after": "team.a", "limit": "7"}) == ("team.", "team.a", 7)
    assert parse({"limit": ""}) == ("", "", 100)
    for q in ({"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"prefix": "a b"},
              {"after": "x>"}, {"prefix": "p" * 129}):
        with pytest.raises(BadQuery):
            parse(q)
