"""The packed per-message int and its accessors."""

from __future__ import annotations

import pytest

from mq9.shard.state import (
    DELIVERED,
    INFLIGHT,
    PENDING,
    is_pending,
    pack,
    prio_of,
    size_of,
    state_of,
    with_state,
)


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
