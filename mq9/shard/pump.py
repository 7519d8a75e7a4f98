"""The delivery pump: pending messages of a mailbox go into flight to its owner
subscriptions, urgent before normal before notify, oldest first, as one ``DeliverRun`` per
subscription and priority, at most a window per mailbox. Every matching plain subscription
gets a message, and one member of each matching queue group. Live sends join the pending
deques, so replay after a SUB and live delivery are the same mechanism."""

from __future__ import annotations

from mq9 import wire
from mq9.shard.core import ShardCore
from mq9.shard.state import INFLIGHT_BITS, PRIO_BITS, PRIORITIES, STATE_MASK, Mailbox, Sub
from mq9.shard.store import Record, decode_record

WINDOW = 1000  # messages in flight per mailbox
# Bytes one pump of one mailbox may carry: a window of 1 MiB messages must not become a
# 1 GiB frame.
PUMP_BYTES = 8 * 1024 * 1024
PUMP_READ = 256  # pending messages read from the store at a time


# One DeliverRun per (subscription, priority name, subject) of a pump.
Runs = dict[tuple[Sub, str, str], wire.DeliverRun]


class Pump(ShardCore):
    """The ``Shard``'s delivery pump."""

    def _records(self, mb: Mailbox, mids: list[int]) -> list[Record | None]:
        """Decoded records of ascending ``mids`` of ``mb``; None for one that cannot be
        read. Messages of the batch being written come from ``fresh``."""
        fresh = self.fresh
        mail_id = mb.mail_id
        out: list[Record | None]
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

    def _record(self, mail_id: str, mid: int) -> Record:
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
        runs: Runs = {}
        self._fill_runs(mb, runs)
        if runs and len(mb.inflight) < self.window:
            g = self.groups[mb.mail_id]  # runs were filled: it has subscribers
            if any(mb.pending[p] for p in range(3) if g.mask & PRIO_BITS[p]):
                self.dirty.add(mb)  # more to push: the next batch comes at once
        out = self.out
        for (s, _, _), run in runs.items():  # in insertion order: urgent before normal
            lst = out.get(s.gw)
            if lst is None:
                lst = out[s.gw] = []
            lst.append(run)

    def _fill_runs(self, mb: Mailbox, runs: Runs) -> None:
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
        # state.is_pending and the INFLIGHT state, inlined: this runs per pushed message
        state_mask, inflight_bits = STATE_MASK, INFLIGHT_BITS
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
                batch: list[int] = []
                want = min(room, PUMP_READ)
                while dq and len(batch) < want:
                    mid = dq.popleft()
                    v = msgs.get(mid)
                    if v is not None and not v & state_mask:  # else stale: not PENDING any more
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
                    msgs[mid] |= inflight_bits
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
