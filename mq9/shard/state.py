"""A mailbox's in-memory state, and the packed int that holds one stored message's.

Every stored message is in one of three states:
  pending    undelivered and not in flight: waits in its priority's deque
  in flight  pushed to one or more owner subscriptions, no Delivered report yet
  delivered  some subscriber got it (or a Query marked it read); kept until evicted

Millions of messages may sit in a shard, so a message is no object but one int in
``Mailbox.msgs``: payload size << 4 | state << 2 | priority index. Read and write it with
the accessors below; the per-message loops of the pump, the send and the Delivered report
use the same masks bound to locals instead (a call per message there is measurable).
"""

from __future__ import annotations

import heapq
from collections import deque

from mq9 import subjects, wire
from mq9.shard.store import Meta

PRIORITIES = subjects.PRIORITIES  # index = delivery order
PRIO_INDEX = {p: i for i, p in enumerate(PRIORITIES)}
PRIO_BITS = tuple(subjects.PRIORITY_BIT[p] for p in PRIORITIES)

PENDING, INFLIGHT, DELIVERED = 0, 1, 2
STATE_MASK = 0b1100  # the state bits of a packed message
PRIO_MASK = 0b11
SIZE_SHIFT = 4
INFLIGHT_BITS = INFLIGHT << 2
DELIVERED_BITS = DELIVERED << 2


def pack(size: int, state: int, prio: int) -> int:
    return size << SIZE_SHIFT | state << 2 | prio


def size_of(v: int) -> int:
    return v >> SIZE_SHIFT


def state_of(v: int) -> int:
    return (v & STATE_MASK) >> 2


def prio_of(v: int) -> int:
    return v & PRIO_MASK


def with_state(v: int, state: int) -> int:
    return (v & ~STATE_MASK) | state << 2


def is_pending(v: int | None) -> bool:
    """``v`` (None: no such message) is a pending message."""
    return v is not None and not v & STATE_MASK


def refusal(rid: int, code: str, text: str) -> wire.Result:
    """The error answer to request ``rid`` (every module of the shard answers this way)."""
    return wire.Result(rid=rid, code=code, error=text)


# A mailbox with no message yet shares these (three empty deques cost ~1.9 KB, most of
# a fresh mailbox's memory); ``pending_deques`` swaps in its own before the first append.
NO_PENDING: tuple = ((), (), ())


class Mailbox:
    __slots__ = ("mail_id", "meta", "latest", "keys", "next_id", "msgs", "pending", "inflight",
                 "delivered", "undelivered", "nbytes", "slot")

    def __init__(self, mail_id: str, meta: Meta, latest: bool,
                 keys: tuple[bytes, bytes] = (b"", b"")):
        self.mail_id = mail_id
        self.meta = meta
        self.latest = latest
        self.keys = keys  # Store.prefixes(mail_id), built once
        self.next_id = 1
        self.msgs: dict[int, int] = {}  # msg_id -> packed (size, state, prio)
        self.pending: tuple = NO_PENDING  # per priority, deques of msg_ids
        self.inflight: dict[int, set] = {}  # msg_id -> the Subs holding it
        self.delivered: list[int] = []  # min-heap: eviction order
        self.undelivered = 0  # pending + in flight
        self.nbytes = 0
        self.slot = 0  # slot_of(mail_id), set when the shard adds it

    def pending_deques(self) -> tuple[deque, deque, deque]:
        if self.pending is NO_PENDING:
            self.pending = (deque(), deque(), deque())
        return self.pending

    # The pending deques are sorted by msg_id and may hold stale ids (messages delivered by
    # a Query or a late Delivered, or replaced in a `latest` mailbox); readers skip any id
    # whose state is not PENDING. A stale id never becomes pending again, so this is exact.

    def requeue(self, ids: list[int]) -> None:
        """Put messages back to pending, each at its msg_id place."""
        by_prio: tuple[list[int], ...] = ([], [], [])
        msgs = self.msgs
        for mid in ids:
            v = msgs[mid]
            msgs[mid] = with_state(v, PENDING)
            by_prio[prio_of(v)].append(mid)
        for p, back in enumerate(by_prio):
            if not back:
                continue
            back.sort()
            dq = self.pending_deques()[p]
            if not dq or back[-1] < dq[0]:
                dq.extendleft(reversed(back))
            else:
                merged = sorted(set(dq).union(back))
                dq.clear()
                dq.extend(merged)

    def compact_pending(self) -> None:
        """Drop stale ids once they outnumber the live ones, so no deque grows without
        bound in a mailbox that is read by Query and never by a subscriber."""
        if sum(map(len, self.pending)) <= 2 * self.undelivered + 64:
            return
        msgs = self.msgs
        for dq in self.pending:
            live = [m for m in dq if is_pending(msgs.get(m))]
            dq.clear()
            dq.extend(live)

    def undelivered_in_order(self, limit: int) -> list[int]:
        """Undelivered (pending or in flight) msg_ids in delivery order, at most ``limit``."""
        out: list[int] = []
        msgs = self.msgs
        inflight_by_prio: tuple[list[int], ...] = ([], [], [])
        for mid in self.inflight:
            inflight_by_prio[prio_of(msgs[mid])].append(mid)
        for p in range(3):
            pend = [m for m in self.pending[p] if is_pending(msgs.get(m))]
            ids = heapq.merge(pend, sorted(inflight_by_prio[p])) if inflight_by_prio[p] else pend
            for mid in ids:
                out.append(mid)
                if len(out) >= limit:
                    return out
        return out
