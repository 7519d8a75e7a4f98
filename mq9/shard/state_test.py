"""The packed per-message int and its accessors; a fresh mailbox's shared empty queues."""

from __future__ import annotations

import pytest

from mq9.shard.state import (
    DELIVERED,
    INFLIGHT,
    NO_PENDING,
    PENDING,
    Mailbox,
    is_pending,
    pack,
    prio_of,
    size_of,
    state_of,
    with_state,
)
from mq9.shard.store import Meta, Store


@pytest.mark.parametrize("size", [0, 1, 255, 8 * 1024 * 1024])
@pytest.mark.parametrize("state", [PENDING, INFLIGHT, DELIVERED])
@pytest.mark.parametrize("prio", [0, 1, 2])
def test_round_trip(size, state, prio):
    v = pack(size, state, prio)
    assert (size_of(v), state_of(v), prio_of(v)) == (size, state, prio)
    assert is_pending(v) == (state == PENDING)
    for other in (PENDING, INFLIGHT, DELIVERED):
        w = with_state(v, other)
        assert (size_of(w), state_of(w), prio_of(w)) == (size, other, prio)


def test_no_message_is_not_pending():
    assert not is_pending(None)


def test_fresh_mailboxes_share_no_queue_contents():
    """Mailboxes without messages share NO_PENDING; the first requeue gives one its own
    deques, and nothing written to one mailbox shows in another."""
    meta = Meta("standard", 0, 0.0, 0.0, b"")
    a = Mailbox("a", meta, False, Store.prefixes("a"))
    b = Mailbox("b", meta, False, Store.prefixes("b"))
    assert a.pending is NO_PENDING and b.pending is NO_PENDING
    a.msgs[7] = pack(3, INFLIGHT, 1)
    a.requeue([7])
    assert a.pending is not NO_PENDING and list(a.pending[1]) == [7]
    assert b.pending is NO_PENDING and not any(b.pending)
    assert b.undelivered_in_order(10) == []
    NO_PENDING[0].append(1)  # a write that missed pending_deques() keeps nothing
    assert not any(NO_PENDING)
