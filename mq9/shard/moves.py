"""Slot moves, the shard's side (driven by ``mq9.cluster.mover``): Export pages of raw records,
Import them on the new owner, Freeze and Drop the old copy. A frozen slot is not served:
its ops are answered ``moved`` and nothing of it is pumped."""

from __future__ import annotations

import msgspec

from mq9 import subjects, wire
from mq9.api import Code
from mq9.cluster.slots import NUM_SLOTS, slot_of
from mq9.shard.core import ShardCore
from mq9.shard.state import Mailbox
from mq9.shard.state import refusal as _err
from mq9.shard.store import META, MSG, Meta, mail_id_of, record_payload_size

_meta_check = msgspec.msgpack.Decoder(Meta)


class Moves(ShardCore):
    """The ``Shard``'s handlers of slot moves."""

    def _slot_set(self, gw: bytes, op: wire.Export | wire.Import | wire.Freeze | wire.Drop,
                  name: str) -> set[int] | None:
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
        after = None if op.after is None else mail_id_of(op.after)
        if op.after is not None and (after is None or slot_of(after) not in slots):
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
            if mail_id is None:
                bad = True
            elif mail_id in ids:
                bad = False
            else:
                bad = not subjects.valid_mail_id(mail_id) or slot_of(mail_id) not in slots
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
