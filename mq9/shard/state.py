"""A shard's in-memory state: a mailbox's (and the packed int that holds one stored
message's), and the owner subscriptions of a mail_id.

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
from enum import IntEnum

from mq9 import subjects, wire
from mq9.shard.store import KeyPrefixes, Meta

PRIORITIES = subjects.PRIORITIES  # index = delivery order
PRIO_INDEX = {p: i for i, p in enumerate(PRIORITIES)}
PRIO_BITS = tuple(subjects.PRIORITY_BIT[p] for p in PRIORITIES)


class MsgState(IntEnum):
    """A stored message's delivery state, as packed into its int (see the module doc)."""

    PENDING = 0
    INFLIGHT = 1
    DELIVERED = 2


PENDING, INFLIGHT, DELIVERED = MsgState.PENDING, MsgState.INFLIGHT, MsgState.DELIVERED
STATE_MASK = 0b1100  # the state bits of a packed message
PRIO_MASK = 0b11
SIZE_SHIFT = 4
INFLIGHT_BITS = INFLIGHT << 2
DELIVERED_BITS = DELIVERED << 2


def pack(size: int, state: MsgState, prio: int) -> int:
    return size << SIZE_SHIFT | state << 2 | prio


def size_of(v: int) -> int:
    return v >> SIZE_SHIFT


def state_of(v: int) -> int:
    """The ``MsgState`` value of ``v`` (a plain int: compare it with the members)."""
    return (v & STATE_MASK) >> 2


def prio_of(v: int) -> int:
    return v & PRIO_MASK


def with_state(v: int, state: MsgState) -> int:
    return (v & ~STATE_MASK) | state << 2


def is_pending(v: int | None) -> bool:
    """``v`` (None: no such message) is a pending message."""
    return v is not None and not v & STATE_MASK


def refusal(rid: int, code: str, text: str) -> wire.Result:
    """The error answer to request ``rid`` (every module of the shard answers this way)."""
    return wire.Result(rid=rid, code=code, error=text)


Pending = tuple[deque[int], deque[int], deque[int]]  # per priority index, msg_ids

# A mailbox with no message yet shares these (three empty deques of its own cost ~1.9 KB,
# most of a fresh mailbox's memory); ``pending_deques`` swaps in its own before the first
# append. maxlen=0: a write that missed the swap can never leak ids into other mailboxes.
_NONE: deque[int] = deque(maxlen=0)
NO_PENDING: Pending = (_NONE, _NONE, _NONE)


class Mailbox:
    __slots__ = ("mail_id", "meta", "latest", "keys", "next_id", "msgs", "pending", "inflight",
                 "delivered", "undelivered", "nbytes", "slot")

    def __init__(self, mail_id: str, meta: Meta, latest: bool, keys: KeyPrefixes):
        self.mail_id = mail_id
        self.meta = meta
        self.latest = latest
        self.keys = keys  # Store.prefixes(mail_id), built once
        self.next_id = 1
        self.msgs: dict[int, int] = {}  # msg_id -> packed (size, state, prio)
        self.pending: Pending = NO_PENDING
        self.inflight: dict[int, set[Sub]] = {}  # msg_id -> the Subs holding it
        self.delivered: list[int] = []  # min-heap: eviction order
        self.undelivered = 0  # pending + in flight
        self.nbytes = 0
        self.slot = 0  # slot_of(mail_id), set when the shard adds it

    def pending_deques(self) -> Pending:
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


# ---- owner subscriptions -------------------------------------------------------------------

class Sub:
    """One owner subscription of a gateway (``key`` is unique within that gateway)."""

    __slots__ = ("gw", "key", "mail_id", "mask", "queue", "inflight")

    def __init__(self, gw: bytes, key: int, mail_id: str, mask: int, queue: str | None):
        self.gw = gw
        self.key = key
        self.mail_id = mail_id
        self.mask = mask
        self.queue = queue
        self.inflight: set[int] = set()


class QueueGroup:
    """The members of one queue group of a mail_id; each message goes to the next one."""

    __slots__ = ("members", "rr")

    def __init__(self) -> None:
        self.members: list[Sub] = []
        self.rr = 0

    def pick(self) -> Sub:
        m = self.members
        self.rr += 1
        return m[self.rr % len(m)]


class Subscribers:
    """Owner subscriptions of one mail_id, kept even while no such mailbox exists (a client
    may SUB before CREATE, or keep its SUB across an expiry and a re-create).

    Queue groups are keyed by (queue name, priority mask), the nearest thing to NATS's
    (subject, queue) identity: ``.*`` and ``.urgent`` subscribers never share a group.
    """

    __slots__ = ("subs", "queues", "plain_by_prio", "queues_by_prio", "mask")

    def __init__(self) -> None:
        self.subs: list[Sub] = []
        self.queues: dict[tuple[str, int], QueueGroup] = {}
        self.plain_by_prio: tuple[list[Sub], ...] = ([], [], [])
        self.queues_by_prio: tuple[list[QueueGroup], ...] = ([], [], [])
        self.mask = 0

    def add(self, sub: Sub) -> None:
        self.subs.append(sub)
        if sub.queue is not None:
            q = self.queues.get((sub.queue, sub.mask))
            if q is None:
                q = self.queues[(sub.queue, sub.mask)] = QueueGroup()
            q.members.append(sub)
        self._index()

    def remove(self, sub: Sub) -> None:
        self.subs.remove(sub)
        if sub.queue is not None:
            qk = (sub.queue, sub.mask)
            q = self.queues[qk]
            q.members.remove(sub)
            if not q.members:
                del self.queues[qk]
        self._index()

    def _index(self) -> None:
        plain: tuple[list[Sub], ...] = ([], [], [])
        queues: tuple[list[QueueGroup], ...] = ([], [], [])
        for p, bit in enumerate(PRIO_BITS):
            for s in self.subs:
                if s.queue is None and s.mask & bit:
                    plain[p].append(s)
            for (_, mask), q in self.queues.items():
                if mask & bit:
                    queues[p].append(q)
        self.plain_by_prio = plain
        self.queues_by_prio = queues
        self.mask = sum(PRIO_BITS[p] for p in range(3) if plain[p] or queues[p])
