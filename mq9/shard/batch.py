"""A shard's mailboxes in memory, driven one batch at a time, independent of ZeroMQ.

``Shard`` is driven by the server loop (or a test)::

    shard.begin(now)                 # once per batch: the clock for TTLs and timestamps
    shard.apply(gw, op)              # every operation of the batch, any gateway
    shard.expire()                   # when the expiry tick is due
    out = shard.finish()             # pump deliveries, write the batch, -> {gw: [answers, DeliverRuns]}

Nothing in ``out`` may leave the process before ``finish`` returns: ``finish`` writes the
batch's RocksDB WriteBatch first, so every acknowledged write and every pushed message is
already stored (store first, then reply, then push).

This module holds the batch protocol, start-up and recovery (rebuilding memory from the
store); the handlers come from one module per concern, named in ``_handlers``:
``ops`` (clients' operations), ``subscriptions`` (owner subscriptions and their reports),
``moves`` (slot moves), ``listing`` (the operator's list); ``pump`` pushes messages,
``state`` holds a mailbox's in-memory state (see there for the delivery states) and a
mail_id's owner subscriptions, and ``core`` declares what the handler modules may use of
the ``Shard`` (each of them subclasses that protocol).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any, ClassVar

from mq9 import api, log, wire
from mq9.api import Code
from mq9.cluster.slots import slot_of
from mq9.shard.core import Outputs, Request
from mq9.shard.listing import Listing
from mq9.shard.moves import Moves
from mq9.shard.ops import Operations
from mq9.shard.pump import WINDOW, Pump
from mq9.shard.state import DELIVERED, PENDING, Mailbox, Sub, Subscribers, pack
from mq9.shard.state import refusal as _err
from mq9.shard.store import LoadedMailbox, Record, Store
from mq9.shard.subscriptions import Subscriptions

# Operations that change stored data (Export commits the batch before reading).
_STORING_OPS = (wire.Create, wire.Send, wire.SendRun, wire.Delete, wire.Export, wire.Import,
                wire.Freeze, wire.Drop)
_REQUESTS = (*_STORING_OPS, wire.Query, wire.ListMailboxes)  # the ops answered by rid

# A handler takes the op whose type is its key in ``Shard._handlers``: a dict cannot tie
# each value's argument type to its key, hence Any.
Handler = Callable[["Shard", bytes, Any], None]


class Shard(Operations, Subscriptions, Moves, Listing, Pump):
    def __init__(self, store: Store, *, max_msgs: int = 10000, window: int = WINDOW,
                 clock: Callable[[], float] = time.time):
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
        self.out: Outputs = {}
        self.dirty: set[Mailbox] = set()
        self.fresh: dict[tuple[str, int], Record] = {}  # records written this batch, not yet readable
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
        prio_of: dict[int, int] = {}
        for p, ids in enumerate(box.undelivered):
            mb.pending_deques()[p].extend(ids)
            for mid in ids:
                prio_of[mid] = p
        msgs = mb.msgs
        for mid, size in box.sizes.items():
            prio = prio_of.get(mid)
            if prio is None:
                msgs[mid] = pack(size, DELIVERED, 0)
                mb.delivered.append(mid)  # ascending ids: already a heap
            else:
                msgs[mid] = pack(size, PENDING, prio)
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

    def apply(self, gw: bytes, op: wire.ToShard) -> None:
        """Handle one operation; an exception in it never escapes (it becomes ``internal``)."""
        try:
            handler = self._handlers[type(op)]
        except KeyError:
            return
        if self.storage_error is not None and isinstance(op, _STORING_OPS):
            name = type(op).__name__.lower()
            self._count(name, Code.UNAVAILABLE)
            return self._reply(gw, _err(op.rid, Code.UNAVAILABLE, api.STORAGE_FAILING))
        try:
            handler(self, gw, op)
        except Exception as e:  # noqa: BLE001 - one bad op must not take the shard down
            self._count(type(op).__name__.lower(), Code.INTERNAL)
            if isinstance(op, _REQUESTS):
                self._reply(gw, _err(op.rid, Code.INTERNAL, api.INTERNAL.format(type(e).__name__)))

    def finish(self) -> Outputs:
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

    def failed_outputs(self) -> Outputs:
        out: Outputs = {}
        for gw, items in self.out.items():
            errs: list[wire.FromShard] = [_err(r.rid, Code.UNAVAILABLE, api.STORAGE_FAILING)
                                          for r in items if isinstance(r, wire.ANSWERS)]
            if errs:
                out[gw] = errs
        self.out = {}
        self.fresh.clear()
        self.store.discard()
        return out

    def discard_failed_write(self) -> Outputs:
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

    def _reply(self, gw: bytes, item: wire.FromShard) -> None:
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

    def _moved(self, gw: bytes, op: Request, name: str) -> bool:
        """Answer ``moved`` if the op's mailbox is in a frozen slot."""
        if slot_of(op.mail_id) not in self.frozen:
            return False
        self._count(name, Code.MOVED)
        self._reply(gw, _err(op.rid, Code.MOVED, api.MOVED))
        return True

    _handlers: ClassVar[dict[type[wire.ToShard], Handler]] = {
        wire.Create: Operations._create,
        wire.Send: Operations._send,
        wire.SendRun: Operations._send_run,
        wire.Query: Operations._query,
        wire.Delete: Operations._delete,
        wire.Subscribe: Subscriptions._subscribe,
        wire.Unsubscribe: Subscriptions._unsubscribe,
        wire.Delivered: Subscriptions._delivered,
        wire.Undelivered: Subscriptions._undelivered,
        wire.Hello: Subscriptions._hello,
        wire.Export: Moves._export,
        wire.Import: Moves._import,
        wire.Freeze: Moves._freeze,
        wire.Drop: Moves._drop,
        wire.ListMailboxes: Listing._list,
    }
