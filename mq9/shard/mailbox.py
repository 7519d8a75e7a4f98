"""A shard's in-memory mailbox state and delivery logic, independent of ZeroMQ.

``Shard`` is driven one batch at a time by the server loop (or a test)::

    shard.begin(now)                 # once per batch: the clock for TTLs and timestamps
    shard.apply(gw, op)              # every operation of the batch, any gateway
    shard.expire()                   # when the expiry tick is due
    out = shard.finish()             # pump deliveries, write the batch, -> {gw: [answers, DeliverRuns]}

Nothing in ``out`` may leave the process before ``finish`` returns: ``finish`` writes the
batch's RocksDB WriteBatch first, so every acknowledged write and every pushed message is
already stored (store first, then reply, then push).

Delivery model. Every stored message is in one of three states:
  pending    undelivered and not in flight: waits in its priority's deque
  in flight  pushed to one or more owner subscriptions, no Delivered report yet
  delivered  some subscriber got it (or a Query marked it read); kept until evicted
The pump moves pending messages into flight (at most ``window`` per mailbox), urgent before
normal before notify, oldest first, to every matching plain subscription and one member of
each matching queue group. A message in flight to a subscription that goes away returns to
pending, unless it is also in flight to another one. Live sends join the pending deques, so
replay after a SUB and live delivery are the same mechanism, and a second subscriber never
gets a message that is already in flight to the first.
"""

from __future__ import annotations

import heapq
import hmac
import time
from collections import deque

import msgspec

from mq9.cluster.slots import NUM_SLOTS, slot_of
from mq9 import api, log, subjects, wire
from mq9.api import Code
from mq9.shard.store import (
    META,
    MSG,
    LoadedMailbox,
    Meta,
    Store,
    decode_record,
    encode_record,
    mail_id_of,
    record_payload_size,
)

PRIORITIES = subjects.PRIORITIES  # index = delivery order
PRIO_INDEX = {p: i for i, p in enumerate(PRIORITIES)}
PRIO_BITS = tuple(subjects.PRIORITY_BIT[p] for p in PRIORITIES)

WINDOW = 1000  # messages in flight per mailbox
# Bytes one pump of one mailbox, or one Query reply, may carry: a window of 1 MiB
# messages must not become a 1 GiB frame.
PUMP_BYTES = 8 * 1024 * 1024
PUMP_READ = 256  # pending messages read from the store at a time
QUERY_BYTES = 8 * 1024 * 1024
# The operator's list (ListMailboxes) runs inside a batch, so one page is bounded in work,
# not only in items: it stops early (``more``) after this many mailbox keys looked at or
# stored messages counted, and the caller asks again from where it stopped.
LIST_MAX = 1000
LIST_SCAN = 20_000
LIST_COUNT = 200_000

# A stored message's in-memory state is one int: payload size << 4 | state << 2 | prio.
# Millions of messages may sit in a shard, so no object per message.
PENDING, INFLIGHT, DELIVERED = 0, 1, 2


def _pack(size: int, state: int, prio: int) -> int:
    return size << 4 | state << 2 | prio


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


class _Queue:
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
        self.queues: dict[tuple[str, int], _Queue] = {}
        self.plain_by_prio: tuple[list[Sub], ...] = ([], [], [])
        self.queues_by_prio: tuple[list[_Queue], ...] = ([], [], [])
        self.mask = 0

    def add(self, sub: Sub) -> None:
        self.subs.append(sub)
        if sub.queue is not None:
            q = self.queues.get((sub.queue, sub.mask))
            if q is None:
                q = self.queues[(sub.queue, sub.mask)] = _Queue()
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
        queues: tuple[list[_Queue], ...] = ([], [], [])
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


# A mailbox with no message yet shares these (three empty deques cost ~1.9 KB, most of
# a fresh mailbox's memory); ``pending_deques`` swaps in its own before the first append.
_NO_PENDING: tuple = ((), (), ())


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
        self.pending: tuple = _NO_PENDING  # per priority, deques of msg_ids
        self.inflight: dict[int, set[Sub]] = {}
        self.delivered: list[int] = []  # min-heap: eviction order
        self.undelivered = 0  # pending + in flight
        self.nbytes = 0
        self.slot = 0  # slot_of(mail_id), set by Shard._add_mailbox

    def pending_deques(self) -> tuple[deque, deque, deque]:
        if self.pending is _NO_PENDING:
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
            msgs[mid] = v & ~0b1100  # state -> PENDING
            by_prio[v & 3].append(mid)
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
            live = [m for m in dq if (msgs.get(m, 0b1000) >> 2) & 3 == PENDING]
            dq.clear()
            dq.extend(live)

    def undelivered_in_order(self, limit: int) -> list[int]:
        """Undelivered (pending or in flight) msg_ids in delivery order, at most ``limit``."""
        out: list[int] = []
        msgs = self.msgs
        inflight_by_prio: tuple[list[int], ...] = ([], [], [])
        for mid in self.inflight:
            inflight_by_prio[msgs[mid] & 3].append(mid)
        for p in range(3):
            pend = [m for m in self.pending[p] if (msgs.get(m, 0b1000) >> 2) & 3 == PENDING]
            ids = heapq.merge(pend, sorted(inflight_by_prio[p])) if inflight_by_prio[p] else pend
            for mid in ids:
                out.append(mid)
                if len(out) >= limit:
                    return out
        return out


_meta_check = msgspec.msgpack.Decoder(Meta)


# Operations that change stored data (Export commits the batch before reading).
_STORING_OPS = frozenset((wire.Create, wire.Send, wire.SendRun, wire.Delete, wire.Export,
                          wire.Import, wire.Freeze, wire.Drop))


def _err(rid: int, code: str, text: str) -> wire.Result:
    return wire.Result(rid=rid, code=code, error=text)


class Shard:
    def __init__(self, store: Store, *, max_msgs: int = 10000, window: int = WINDOW,
                 clock=time.time):
        self.store = store
        self.max_msgs = max(1, max_msgs)
        self.window = max(1, window)
        self.clock = clock
        self.now = clock()
        self.mailboxes: dict[str, Mailbox] = {}
        self.groups: dict[str, Subscribers] = {}
        self.subs: dict[bytes, dict[int, Sub]] = {}  # gw -> key -> Sub
        self.expiry: list[tuple[float, str]] = []  # heap; stale entries skipped
        self.total_msgs = 0
        self.total_bytes = 0
        self.corrupt = 0  # unreadable records dropped (for metrics)
        self.pump_errors = 0
        # Slot moves. A frozen slot is not served (ops answered "moved", nothing pumped): it
        # was given away, or is being imported. Persisted in the store (F key).
        self.frozen: set[int] = set()
        self.by_slot: dict[int, set[str]] = {}  # slot -> mail_ids in memory
        # Mailboxes written by Import pages but not loaded yet (until the "done" page).
        self.importing: dict[int, set[str]] = {}
        self.write_error: Exception | None = None  # a mid-batch commit failed
        # Set while RocksDB refuses writes (disk full, read-only, I/O error): requests that
        # must store something are refused with ``unavailable`` instead of being applied.
        self.storage_error: str | None = None
        # Per batch:
        self.out: dict[bytes, list] = {}
        self.dirty: set[Mailbox] = set()
        self.fresh: dict[tuple[str, int], tuple] = {}  # records written this batch, not yet readable
        self.ops: dict[tuple[str, str], int] = {}  # (op, result) -> count, for metrics
        self.sends_ok = 0  # the hot one, kept out of ``ops`` until taken
        self.now_ms = int(self.now * 1000)

    # ---- startup -----------------------------------------------------------------------

    def load(self) -> None:
        self.now = self.clock()
        self.frozen = self.store.get_frozen()
        for box in self.store.load(self.now):
            self._add_mailbox(self._build(box))

    def _build(self, box: LoadedMailbox) -> Mailbox:
        """The in-memory state of one mailbox scanned from disk (startup and Import)."""
        mb = Mailbox(box.mail_id, box.meta, box.meta.type == "latest", self.store.prefixes(box.mail_id))
        prio_of = {}
        for p, ids in enumerate(box.undelivered):
            mb.pending_deques()[p].extend(ids)
            for mid in ids:
                prio_of[mid] = p
        msgs = mb.msgs
        for mid, size in box.sizes.items():
            p = prio_of.get(mid)
            if p is None:
                msgs[mid] = _pack(size, DELIVERED, 0)
                mb.delivered.append(mid)  # ascending ids: already a heap
            else:
                msgs[mid] = _pack(size, PENDING, p)
            mb.nbytes += size
        mb.undelivered = len(prio_of)
        mb.next_id = (max(box.sizes) + 1) if box.sizes else 1
        return mb

    def _add_mailbox(self, mb: Mailbox) -> None:
        self.mailboxes[mb.mail_id] = mb
        mb.slot = slot = slot_of(mb.mail_id)
        ids = self.by_slot.get(slot)
        if ids is None:
            ids = self.by_slot[slot] = set()
        ids.add(mb.mail_id)
        self.total_msgs += len(mb.msgs)
        self.total_bytes += mb.nbytes
        if mb.meta.expires_at:
            heapq.heappush(self.expiry, (mb.meta.expires_at, mb.mail_id))

    # ---- batch protocol ------------------------------------------------------------------

    def begin(self, now: float | None = None) -> None:
        self.now = self.clock() if now is None else now
        self.now_ms = int(self.now * 1000)

    def apply(self, gw: bytes, op) -> None:
        """Handle one operation; an exception in it never escapes (it becomes ``internal``)."""
        try:
            handler = self._handlers[type(op)]
        except KeyError:
            return
        if self.storage_error is not None and type(op) in _STORING_OPS:
            name = type(op).__name__.lower()
            self._count(name, Code.UNAVAILABLE)
            return self._reply(gw, _err(op.rid, Code.UNAVAILABLE, api.STORAGE_FAILING))
        try:
            handler(self, gw, op)
        except Exception as e:  # noqa: BLE001 - one bad op must not take the shard down
            self._count(type(op).__name__.lower(), Code.INTERNAL)
            rid = getattr(op, "rid", None)
            if rid is not None:
                self._reply(gw, _err(rid, Code.INTERNAL, api.INTERNAL.format(type(e).__name__)))

    def finish(self) -> dict[bytes, list]:
        """Pump, write the batch, and hand over everything to send, per gateway.

        If the write fails, the exception propagates and ``failed_outputs`` gives the replies
        to send instead (errors only: nothing of this batch may be acknowledged or pushed).
        """
        if self.write_error is not None:
            e, self.write_error = self.write_error, None
            raise e
        if self.dirty:
            dirty = self.dirty
            self.dirty = set()
            frozen = self.frozen
            for mb in dirty:
                if frozen and mb.slot in frozen:
                    continue
                if self.mailboxes.get(mb.mail_id) is mb:
                    try:
                        self._pump(mb)
                    except Exception:  # noqa: BLE001 - a bug in one mailbox must not stop the rest
                        self.pump_errors += 1
                        if self.pump_errors <= 10:
                            log.exception("shard_pump_failed", mail_id=mb.mail_id)
        self.store.commit()
        out = self.out
        self.out = {}
        self.fresh.clear()
        return out

    def failed_outputs(self) -> dict[bytes, list]:
        out: dict[bytes, list] = {}
        for gw, items in self.out.items():
            errs = [_err(r.rid, Code.UNAVAILABLE, api.STORAGE_FAILING)
                    for r in items if type(r) in wire.ANSWERS]
            if errs:
                out[gw] = errs
        self.out = {}
        self.fresh.clear()
        self.store.discard()
        return out

    def discard_failed_write(self) -> dict[bytes, list]:
        """While ``storage_error`` is set, a batch holds no stored-data change (those ops are
        refused), only delivery marks and expiries: its failed write is dropped and its
        replies and pushes go out. A lost mark means a redelivery after a restart, never a
        lost message."""
        self.store.discard()
        out = self.out
        self.out = {}
        self.fresh.clear()
        self.write_error = None
        return out

    def reload(self) -> None:
        """Rebuild the in-memory state from what the store holds, after a failed write left
        memory ahead of the disk. Owner subscriptions stay (their gateways are not told);
        what was in flight is pending again and may be pushed a second time."""
        subs = [(s.gw, wire.Subscribe(key=s.key, mail_id=s.mail_id, priorities=s.mask, queue=s.queue))
                for by_key in self.subs.values() for s in by_key.values()]
        self.store.discard()
        self.mailboxes, self.groups, self.subs = {}, {}, {}
        self.expiry, self.by_slot, self.importing = [], {}, {}
        self.total_msgs = self.total_bytes = 0
        self.dirty, self.out, self.write_error = set(), {}, None
        self.fresh.clear()
        self.load()
        for gw, op in subs:
            self._subscribe(gw, op)

    def take_op_counts(self) -> dict[tuple[str, str], int]:
        if self.sends_ok:
            self._count("send", "ok", self.sends_ok)
            self.sends_ok = 0
        ops = self.ops
        self.ops = {}
        return ops

    def next_expiry(self) -> float | None:
        return self.expiry[0][0] if self.expiry else None

    def expire(self) -> int:
        """Delete every mailbox whose TTL has passed; returns how many."""
        n = 0
        heap = self.expiry
        now = self.now
        while heap and heap[0][0] <= now:
            at, mail_id = heapq.heappop(heap)
            mb = self.mailboxes.get(mail_id)
            if mb is not None and mb.meta.expires_at == at:
                self._drop_mailbox(mb)
                n += 1
        if n:
            self._count("expire", "ok", n)
        return n

    # ---- helpers ---------------------------------------------------------------------------

    def _reply(self, gw: bytes, item) -> None:
        lst = self.out.get(gw)
        if lst is None:
            lst = self.out[gw] = []
        lst.append(item)

    def _count(self, op: str, result: str, n: int = 1) -> None:
        k = (op, result)
        self.ops[k] = self.ops.get(k, 0) + n

    def _live(self, mail_id: str) -> Mailbox | None:
        mb = self.mailboxes.get(mail_id)
        if mb is not None and mb.meta.expires_at and mb.meta.expires_at <= self.now:
            self._drop_mailbox(mb)
            self._count("expire", "ok")
            return None
        return mb

    def _drop_mailbox(self, mb: Mailbox) -> None:
        self.store.delete_mailbox(mb.mail_id)
        self._forget(mb)

    def _forget(self, mb: Mailbox) -> None:
        """Remove a mailbox from memory only (its records stay on disk)."""
        del self.mailboxes[mb.mail_id]
        ids = self.by_slot.get(mb.slot)
        if ids is not None:
            ids.discard(mb.mail_id)
            if not ids:
                del self.by_slot[mb.slot]
        self.total_msgs -= len(mb.msgs)
        self.total_bytes -= mb.nbytes
        for mid, subs in mb.inflight.items():
            for s in subs:
                s.inflight.discard(mid)
        mb.inflight.clear()
        self.dirty.discard(mb)
        if self.fresh:
            for k in [k for k in self.fresh if k[0] == mb.mail_id]:
                del self.fresh[k]

    def _moved(self, gw: bytes, op, name: str) -> bool:
        """Answer ``moved`` if the op's mailbox is in a frozen slot."""
        if slot_of(op.mail_id) not in self.frozen:
            return False
        self._count(name, Code.MOVED)
        self._reply(gw, _err(op.rid, Code.MOVED, api.MOVED))
        return True

    def _check_token(self, mb: Mailbox, token_hash: bytes) -> bool:
        return bool(token_hash) and hmac.compare_digest(mb.meta.token_hash, token_hash)

    # ---- operations ------------------------------------------------------------------------

    def _create(self, gw: bytes, op: wire.Create) -> None:
        why = (None if subjects.valid_mail_id(op.mail_id) else api.BAD_MAIL_ID) \
            or api.check_type(op.type) or api.check_int("ttl", op.ttl, 0)
        if why:
            self._count("create", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, why))
        if self.frozen and self._moved(gw, op, "create"):
            return
        if self._live(op.mail_id) is not None:
            self._count("create", Code.EXISTS)
            return self._reply(gw, _err(op.rid, Code.EXISTS, api.EXISTS.format(op.mail_id)))
        now = self.now
        expires_at = now + op.ttl if op.ttl else 0.0
        meta = Meta(op.type, op.ttl, now, expires_at, op.token_hash)
        self.store.put_meta(op.mail_id, meta)
        mb = Mailbox(op.mail_id, meta, op.type == "latest", self.store.prefixes(op.mail_id))
        self._add_mailbox(mb)
        self._count("create", "ok")
        # ceil: never claim an earlier expiry
        created = api.Created(op.mail_id, op.type, op.ttl, -int(-expires_at // 1))
        self._reply(gw, wire.Result(rid=op.rid, data=api.to_builtins(created)))

    def _send(self, gw: bytes, op: wire.Send) -> None:
        target = self._send_target(gw, op)
        if target is None:
            return
        r = self._store_message(target[0], target[1], op.subject, op.headers, op.payload)
        if r.__class__ is int:
            out = self.out.get(gw)
            if out is None:
                out = self.out[gw] = []
            out.append(wire.Sent(op.rid, op.mail_id, r, op.priority))
        else:
            self._reply(gw, _err(op.rid, r[0], r[1]))

    def _send_run(self, gw: bytes, op: wire.SendRun) -> None:
        target = self._send_target(gw, op)
        if target is None:
            return
        mb, prio = target
        store, subject = self._store_message, op.subject
        self._reply(gw, wire.SentRun(op.rid, [store(mb, prio, subject, None, p)
                                              for p in op.payloads]))

    def _send_target(self, gw: bytes, op) -> tuple[Mailbox, int] | None:
        """The mailbox and priority index a Send/SendRun stores into, or None after
        answering why not."""
        mail_id = op.mail_id
        if self.frozen and self._moved(gw, op, "send"):
            return None
        mb = self.mailboxes.get(mail_id)
        if mb is not None and mb.meta.expires_at and mb.meta.expires_at <= self.now:
            mb = self._live(mail_id)
        if mb is None:
            self._count("send", Code.NOT_FOUND)
            self._reply(gw, _err(op.rid, Code.NOT_FOUND, api.NOT_FOUND.format(mail_id)))
            return None
        prio = PRIO_INDEX.get(op.priority)
        if prio is None:
            self._count("send", Code.BAD_REQUEST)
            self._reply(gw, _err(op.rid, Code.BAD_REQUEST, api.check_priority(op.priority)))
            return None
        return mb, prio

    def _store_message(self, mb: Mailbox, prio: int, subject: str, headers: bytes | None,
                       payload: bytes):
        """Store one message; its msg_id, or (code, text) if the mailbox is full."""
        store = self.store
        msgs = mb.msgs
        mail_id = mb.mail_id
        if mb.latest:
            for old in list(msgs):
                self._remove_message(mb, old)
            if mb.pending is not _NO_PENDING:
                for dq in mb.pending:
                    dq.clear()  # only stale ids are left in them
        elif len(msgs) >= self.max_msgs:
            over = len(msgs) - self.max_msgs + 1
            if len(mb.delivered) < over:
                self._count("send", Code.FULL)
                return (Code.FULL, api.FULL.format(mail_id, self.max_msgs))
            for _ in range(over):
                old = heapq.heappop(mb.delivered)
                v = msgs.pop(old)
                mb.nbytes -= v >> 4
                self.total_bytes -= v >> 4
                self.total_msgs -= 1
                store.delete_message(mail_id, old, None)
        msg_id = mb.next_id
        mb.next_id = msg_id + 1
        ts = self.now_ms
        size = len(payload)
        store.put_message_at(mb.keys, msg_id, prio, encode_record(prio, ts, subject, headers, payload))
        self.fresh[(mail_id, msg_id)] = (prio, ts, subject, headers, payload)
        msgs[msg_id] = size << 4 | prio  # state PENDING
        mb.pending_deques()[prio].append(msg_id)
        mb.undelivered += 1
        mb.nbytes += size
        self.total_msgs += 1
        self.total_bytes += size
        g = self.groups.get(mail_id)
        if g is not None and g.mask & PRIO_BITS[prio]:
            self.dirty.add(mb)
        self.sends_ok += 1
        return msg_id

    def _remove_message(self, mb: Mailbox, mid: int) -> None:
        v = mb.msgs.pop(mid)
        state = (v >> 2) & 3
        if state == DELIVERED:
            mb.delivered.remove(mid)
            heapq.heapify(mb.delivered)
            self.store.delete_message(mb.mail_id, mid, None)
        else:
            mb.undelivered -= 1
            if state == INFLIGHT:
                for s in mb.inflight.pop(mid):
                    s.inflight.discard(mid)
            self.store.delete_message(mb.mail_id, mid, v & 3)
        mb.nbytes -= v >> 4
        self.total_bytes -= v >> 4
        self.total_msgs -= 1
        self.fresh.pop((mb.mail_id, mid), None)

    def _authorized(self, gw: bytes, op, name: str):
        """The live mailbox ``op`` names if its token matches; else the error is answered
        and counted, and None returned."""
        if self.frozen and self._moved(gw, op, name):
            return None
        mb = self._live(op.mail_id)
        if mb is None:
            self._count(name, Code.NOT_FOUND)
            self._reply(gw, _err(op.rid, Code.NOT_FOUND, api.NOT_FOUND.format(op.mail_id)))
            return None
        if not self._check_token(mb, op.token_hash):
            self._count(name, Code.AUTH)
            self._reply(gw, _err(op.rid, Code.AUTH, api.WRONG_TOKEN))
            return None
        return mb

    def _query(self, gw: bytes, op: wire.Query) -> None:
        mb = self._authorized(gw, op, "query")
        if mb is None:
            return
        why = api.check_int("limit", op.limit, 1, api.QUERY_MAX)
        if why:
            self._count("query", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, why))
        ids = mb.undelivered_in_order(op.limit)
        messages = []
        budget = QUERY_BYTES
        for i, mid in enumerate(ids):
            prio, ts, subject, _headers, payload = self._record(mb.mail_id, mid)
            budget -= len(payload)
            if budget < 0 and messages:
                del ids[i:]  # fewer than asked; "unread" tells the client there is more
                break
            messages.append(api.message(mid, PRIORITIES[prio], subject, ts, payload))
        if op.mark_read and ids:
            self._mark_delivered(mb, ids)
        self._count("query", "ok")
        reply = api.QueryReply(mb.mail_id, mb.undelivered, messages)
        self._reply(gw, wire.Result(rid=op.rid, data=api.to_builtins(reply)))

    def _delete(self, gw: bytes, op: wire.Delete) -> None:
        mb = self._authorized(gw, op, "delete")
        if mb is None:
            return
        self._drop_mailbox(mb)
        self._count("delete", "ok")
        self._reply(gw, wire.Result(rid=op.rid, data=api.to_builtins(api.Deleted(op.mail_id))))

    def _subscribe(self, gw: bytes, op: wire.Subscribe) -> None:
        mask = op.priorities & subjects.ALL_PRIORITIES
        by_key = self.subs.get(gw)
        if by_key is None:
            by_key = self.subs[gw] = {}
        old = by_key.get(op.key)
        if old is not None:
            if (old.mail_id, old.mask, old.queue) == (op.mail_id, mask, op.queue):
                return  # re-registered after a reconnect: keep what is in flight to it
            self._drop_sub(old)
        if not mask or not subjects.valid_mail_id(op.mail_id):
            return
        sub = by_key[op.key] = Sub(gw, op.key, op.mail_id, mask, op.queue)
        g = self.groups.get(op.mail_id)
        if g is None:
            g = self.groups[op.mail_id] = Subscribers()
        g.add(sub)
        mb = self._live(op.mail_id)
        if mb is not None:
            self.dirty.add(mb)

    def _unsubscribe(self, gw: bytes, op: wire.Unsubscribe) -> None:
        sub = self.subs.get(gw, {}).get(op.key)
        if sub is not None:
            self._drop_sub(sub)

    def _hello(self, gw: bytes, op: wire.Hello) -> None:
        for sub in list(self.subs.get(gw, {}).values()):
            self._drop_sub(sub)
        self.subs.pop(gw, None)

    def drop_gateway(self, gw: bytes) -> None:
        """The gateway is unreachable: its subscriptions are gone, like after a Hello."""
        self._hello(gw, wire.Hello())

    def _drop_sub(self, sub: Sub) -> None:
        by_key = self.subs.get(sub.gw)
        if by_key is not None and by_key.get(sub.key) is sub:
            del by_key[sub.key]
        g = self.groups.get(sub.mail_id)
        if g is not None:
            g.remove(sub)
            if not g.subs:
                del self.groups[sub.mail_id]
        mb = self.mailboxes.get(sub.mail_id)
        if mb is None or not sub.inflight:
            sub.inflight.clear()
            return
        self._give_back(mb, sub, list(sub.inflight))
        sub.inflight.clear()

    def _delivered(self, gw: bytes, op: wire.Delivered) -> None:
        mb = self.mailboxes.get(op.mail_id)
        if mb is not None:
            self._mark_delivered(mb, op.msg_ids)

    def _mark_delivered(self, mb: Mailbox, ids) -> None:
        msgs = mb.msgs
        store = self.store
        n = stale = 0
        for mid in ids:
            v = msgs.get(mid)
            if v is None:
                continue
            state = (v >> 2) & 3
            if state == DELIVERED:
                continue
            if state == INFLIGHT:
                for s in mb.inflight.pop(mid):
                    s.inflight.discard(mid)
            else:
                stale += 1  # stays in its deque as a stale entry (see Mailbox)
            msgs[mid] = (v & ~0b1100) | DELIVERED << 2
            store.mark_delivered_at(mb.keys, v & 3, mid)
            heapq.heappush(mb.delivered, mid)
            n += 1
        if n:
            mb.undelivered -= n
            if stale:
                mb.compact_pending()
            if mb.mail_id in self.groups:
                self.dirty.add(mb)

    def _undelivered(self, gw: bytes, op: wire.Undelivered) -> None:
        sub = self.subs.get(gw, {}).get(op.key)
        mb = self.mailboxes.get(op.mail_id)
        if sub is None or mb is None or sub.mail_id != op.mail_id:
            return
        mine = [mid for mid in op.msg_ids if mid in sub.inflight]
        sub.inflight.difference_update(mine)
        self._give_back(mb, sub, mine)

    def _give_back(self, mb: Mailbox, sub: Sub, mids) -> None:
        """``sub`` no longer holds ``mids``: those nobody else holds go back to pending."""
        back = []
        for mid in mids:
            holders = mb.inflight.get(mid)
            if holders is None:
                continue
            holders.discard(sub)
            if not holders:
                del mb.inflight[mid]
                back.append(mid)
        if back:
            mb.requeue(back)
            self.dirty.add(mb)

    # ---- slot moves (from the leader's mover) -----------------------------------------------

    def _slot_set(self, gw: bytes, op, name: str) -> set[int] | None:
        slots = op.slots
        if not slots or not all(type(x) is int and 0 <= x < NUM_SLOTS for x in slots):
            self._count(name, Code.BAD_REQUEST)
            self._reply(gw, _err(op.rid, Code.BAD_REQUEST, f"'slots' must be a non-empty list of 0..{NUM_SLOTS - 1}"))
            return None
        return set(slots)

    def _in_slots(self, slots: set[int]) -> list[Mailbox]:
        mbs = self.mailboxes
        return [mbs[m] for s in slots for m in self.by_slot.get(s, ())]

    def _commit_now(self) -> None:
        """Write the batch so far, so a read of RocksDB sees every write acknowledged
        before it. A failure is re-raised by ``finish`` (the earlier ops' replies must turn
        into errors), not swallowed by ``apply``."""
        try:
            self.store.commit()
        except Exception as e:
            self.write_error = e
            raise

    def _freeze_slots(self, slots: set[int]) -> tuple[int, int]:
        """Stop serving ``slots``; returns how many mailboxes that touched and how many
        in-flight messages went back to pending."""
        new = slots - self.frozen
        if not new:
            return 0, 0
        self.frozen |= new
        self.store.put_frozen(self.frozen)
        n = returned = 0
        for mb in self._in_slots(new):
            n += 1
            returned += len(mb.inflight)
            self.dirty.discard(mb)
            if mb.inflight:
                # Back to pending, so the export (whose disk marks never left) and this
                # state agree; a Delivered still arriving for them is applied as usual.
                back = list(mb.inflight)
                for mid, holders in mb.inflight.items():
                    for sub in holders:
                        sub.inflight.discard(mid)
                mb.inflight.clear()
                mb.requeue(back)
        return n, returned

    def _forget_imports(self, slots: set[int]) -> None:
        for s in slots:
            for mail_id in self.importing.pop(s, ()):
                if mail_id not in self.mailboxes:
                    self.store.delete_mailbox(mail_id)

    def _freeze(self, gw: bytes, op: wire.Freeze) -> None:
        slots = self._slot_set(gw, op, "freeze")
        if slots is None:
            return
        n, returned = self._freeze_slots(slots)
        self._count("freeze", "ok")
        self._reply(gw, wire.Result(rid=op.rid, data={"frozen": sorted(slots), "mailboxes": n,
                                                      "inflight": returned}))

    def _export(self, gw: bytes, op: wire.Export) -> None:
        slots = self._slot_set(gw, op, "export")
        if slots is None:
            return
        if op.max_bytes < 1:
            self._count("export", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, "'max_bytes' must be >= 1"))
        if op.after is not None and (mail_id_of(op.after) is None or slot_of(mail_id_of(op.after)) not in slots):
            self._count("export", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, "'after' is no record key of these slots"))
        self._commit_now()
        ids = [m for s in slots for m in self.by_slot.get(s, ())]
        pairs, nxt = self.store.export(ids, op.after, op.max_bytes)
        self._count("export", "ok")
        self._reply(gw, wire.Result(rid=op.rid, data={"pairs": pairs, "next": nxt}))

    def _import(self, gw: bytes, op: wire.Import) -> None:
        slots = self._slot_set(gw, op, "import")
        if slots is None:
            return
        # Check the whole page before writing any of it: a bad page writes nothing.
        ids: dict[str, int] = {}  # mail_id -> slot
        for k, v in op.pairs:
            mail_id = mail_id_of(k)
            if mail_id in ids:
                bad = False
            else:
                bad = (mail_id is None or not subjects.valid_mail_id(mail_id)
                       or slot_of(mail_id) not in slots)
                if not bad:
                    ids[mail_id] = slot_of(mail_id)
            if not bad:
                fam = k[:2]
                if fam == META:
                    try:
                        _meta_check.decode(v)
                    except msgspec.DecodeError:
                        bad = True
                elif fam == MSG:
                    bad = len(v) < 4 or record_payload_size(v) < 0
            if bad:
                self._count("import", Code.BAD_REQUEST)
                return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, f"record {k[:80]!r} is not of these slots"))
        # Frozen until "done": a half-copied mailbox is never served or pumped, even after
        # a restart mid-copy (the startup loader loads whatever pages arrived).
        self._freeze_slots(slots)
        if op.reset:
            for mb in self._in_slots(slots):
                self._drop_mailbox(mb)
            self._forget_imports(slots)
        put = self.store.put_raw
        for k, v in op.pairs:
            put(k, v)
        for mail_id, s in ids.items():
            got = self.importing.get(s)
            if got is None:
                got = self.importing[s] = set()
            got.add(mail_id)
        data = {"written": len(op.pairs)}
        if op.done:
            self._commit_now()
            reload = {m for s in slots for m in self.importing.pop(s, ())}
            for mb in self._in_slots(slots):
                reload.add(mb.mail_id)
                self._forget(mb)
            n = 0
            for box in self.store.load(self.now, reload):
                mb = self._build(box)
                self._add_mailbox(mb)
                n += 1
                if mb.mail_id in self.groups:
                    self.dirty.add(mb)  # subscriptions made before the import get their replay
            self.frozen -= slots
            self.store.put_frozen(self.frozen)
            data["mailboxes"] = n
        self._count("import", "ok")
        self._reply(gw, wire.Result(rid=op.rid, data=data))

    def _drop(self, gw: bytes, op: wire.Drop) -> None:
        slots = self._slot_set(gw, op, "drop")
        if slots is None:
            return
        # Frozen even if the mover skipped Freeze: a slot whose data is gone must answer
        # "moved", never "not_found".
        self._freeze_slots(slots)
        n = 0
        for mb in self._in_slots(slots):
            self._drop_mailbox(mb)
            n += 1
        self._forget_imports(slots)
        self._count("drop", "ok")
        self._reply(gw, wire.Result(rid=op.rid, data={"dropped": n}))

    # ---- the operator's list -----------------------------------------------------------

    def _list(self, gw: bytes, op: wire.ListMailboxes) -> None:
        if not 1 <= op.limit <= LIST_MAX:
            self._count("list", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST, f"'limit' must be between 1 and {LIST_MAX}"))
        if not (subjects.valid_mail_id_part(op.prefix) and subjects.valid_mail_id_part(op.after)):
            self._count("list", Code.BAD_REQUEST)
            return self._reply(gw, _err(op.rid, Code.BAD_REQUEST,
                                        "'prefix' and 'after' may hold only the characters of a mail_id"))
        # RocksDB's meta keys are the sorted index: walking them costs a page, whereas
        # sorting the in-memory dict would cost every mailbox of the shard, every page.
        items: list[wire.MailboxInfo] = []
        last = None
        more = False
        scanned = counted = 0
        prefix, after = op.prefix, op.after
        frozen = self.frozen
        now = self.now
        for mail_id in self.store.mail_ids_from(max(prefix, after)):
            if not mail_id.startswith(prefix):
                break
            if mail_id <= after:
                continue
            if len(items) >= op.limit or scanned >= LIST_SCAN or counted >= LIST_COUNT:
                more = True
                break
            scanned += 1
            last = mail_id
            mb = self.mailboxes.get(mail_id)
            # Not served here: being imported, moved away (frozen), or expired this instant.
            if mb is None or (frozen and mb.slot in frozen) or 0 < mb.meta.expires_at <= now:
                continue
            counted += len(mb.msgs)
            items.append(self._info(mb))
        total = None
        if not prefix:
            total = len(self.mailboxes) - sum(len(self.by_slot.get(s, ())) for s in frozen)
        self._count("list", "ok")
        self._reply(gw, wire.MailboxList(op.rid, items, more, last, total))

    def _info(self, mb: Mailbox) -> wire.MailboxInfo:
        unread = [0, 0, 0]
        if mb.undelivered:
            for v in mb.msgs.values():
                if not v & DELIVERED << 2:  # pending or in flight
                    unread[v & 3] += 1
        meta = mb.meta
        g = self.groups.get(mb.mail_id)
        return wire.MailboxInfo(mb.mail_id, meta.type, meta.created, meta.expires_at, meta.ttl,
                                tuple(unread), len(mb.msgs), mb.nbytes, len(g.subs) if g else 0)

    _handlers = {
        wire.Create: _create,
        wire.Send: _send,
        wire.SendRun: _send_run,
        wire.Query: _query,
        wire.Delete: _delete,
        wire.Subscribe: _subscribe,
        wire.Unsubscribe: _unsubscribe,
        wire.Delivered: _delivered,
        wire.Undelivered: _undelivered,
        wire.Hello: _hello,
        wire.Export: _export,
        wire.Import: _import,
        wire.Freeze: _freeze,
        wire.Drop: _drop,
        wire.ListMailboxes: _list,
    }

    # ---- delivery --------------------------------------------------------------------------

    def _records(self, mb: Mailbox, mids: list[int]) -> list[tuple | None]:
        """Decoded records of ascending ``mids`` of ``mb``; None for one that cannot be
        read. Messages of the batch being written come from ``fresh``."""
        fresh = self.fresh
        mail_id = mb.mail_id
        if fresh:
            out = [fresh.get((mail_id, m)) for m in mids]
            missing = [m for m, r in zip(mids, out) if r is None]
            if not missing:
                return out
        else:
            out = [None] * len(mids)
            missing = mids
        raws = iter(self.store.get_records(mb.keys[0], missing))
        for i, r in enumerate(out):
            if r is None:
                raw = next(raws)
                if raw is not None:
                    try:
                        out[i] = decode_record(raw)
                    except Exception:  # noqa: BLE001 - corrupt record: reported as None
                        pass
        return out

    def _record(self, mail_id: str, mid: int) -> tuple:
        rec = self.fresh.get((mail_id, mid))
        if rec is not None:
            return rec
        raw = self.store.get_record(mail_id, mid)
        if raw is None:
            raise KeyError(f"message {mail_id}/{mid} missing from store")
        return decode_record(raw)

    def _pump(self, mb: Mailbox) -> None:
        """Push pending messages of ``mb`` to its owner subscriptions, as one DeliverRun
        per subscription and priority."""
        runs: dict[tuple, wire.DeliverRun] = {}
        self._fill_runs(mb, runs)
        if runs and len(mb.inflight) < self.window:
            g = self.groups.get(mb.mail_id)
            if any(mb.pending[p] for p in range(3) if g.mask & PRIO_BITS[p]):
                self.dirty.add(mb)  # more to push: the next batch comes at once
        out = self.out
        for (s, _, _), run in runs.items():  # in insertion order: urgent before normal
            lst = out.get(s.gw)
            if lst is None:
                lst = out[s.gw] = []
            lst.append(run)

    def _fill_runs(self, mb: Mailbox, runs: dict) -> None:
        g = self.groups.get(mb.mail_id)
        if g is None or not g.mask:
            return
        room = self.window - len(mb.inflight)
        if room <= 0:
            return
        # A quantum per batch, the rest in the next batch (see _pump): the gateway then
        # writes one part to the client while this shard reads the next, instead of the
        # two taking turns over a whole window.
        room = min(room, PUMP_READ)
        msgs = mb.msgs
        inflight = mb.inflight
        mail_id = mb.mail_id
        DeliverRun = wire.DeliverRun
        budget = PUMP_BYTES
        for p in range(3):
            if not g.mask & PRIO_BITS[p]:
                continue
            dq = mb.pending[p]
            if not dq:
                continue
            plain = g.plain_by_prio[p]
            queues = g.queues_by_prio[p]
            pname = PRIORITIES[p]
            while dq and room:
                if budget <= 0:
                    # Enough bytes for one frame; carry on next batch, after other work.
                    self.dirty.add(mb)
                    return
                # The next pending ids, read from the store together (see get_records).
                batch = []
                want = min(room, PUMP_READ)
                while dq and len(batch) < want:
                    mid = dq.popleft()
                    v = msgs.get(mid)
                    if v is not None and not v & 0b1100:  # else stale: not PENDING any more
                        batch.append(mid)
                if not batch:
                    break
                records = self._records(mb, batch)
                for i, mid in enumerate(batch):
                    if budget <= 0:
                        dq.extendleft(reversed(batch[i:]))
                        self.dirty.add(mb)
                        return
                    rec = records[i]
                    if rec is None:
                        # A record that cannot be read (corruption) would block the queue
                        # forever; drop it and keep delivering the rest.
                        self._remove_message(mb, mid)
                        self.corrupt += 1
                        continue
                    _, _, subject, headers, payload = rec
                    targets = plain + [q.pick() for q in queues] if queues else plain
                    holders = set(targets)
                    inflight[mid] = holders
                    msgs[mid] |= INFLIGHT << 2
                    room -= 1
                    budget -= len(payload) * len(targets)
                    for s in targets:
                        s.inflight.add(mid)
                        # (the subject of a mailbox's messages of one priority is always
                        # the same; keying on it keeps a run's subject exact regardless)
                        run = runs.get((s, pname, subject))
                        if run is None:
                            run = runs[(s, pname, subject)] = DeliverRun(
                                s.key, mail_id, pname, subject, [], [])
                        run.msg_ids.append(mid)
                        run.payloads.append(payload)
                        if headers is not None:
                            if run.headers is None:
                                run.headers = [None] * (len(run.msg_ids) - 1)
                            run.headers.append(headers)
                        elif run.headers is not None:
                            run.headers.append(None)
            if not room:
                return
