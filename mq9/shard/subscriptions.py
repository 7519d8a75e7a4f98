"""Owner subscriptions in a shard: who holds which message, and the Delivered,
Undelivered, Unsubscribe and Hello reports that give messages back or mark them delivered.

A message in flight to one subscription is never pushed to another; one in flight to a
subscription that goes away returns to pending unless another one also holds it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from mq9 import subjects, wire
from mq9.shard.core import ShardCore
from mq9.shard.state import DELIVERED_BITS, INFLIGHT_BITS, PRIO_MASK, STATE_MASK, Mailbox, Sub, Subscribers


class Subscriptions(ShardCore):
    """The ``Shard``'s handlers of subscription reports."""

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

    def _mark_delivered(self, mb: Mailbox, ids: list[int]) -> None:
        msgs = mb.msgs
        store = self.store
        n = stale = 0
        # state.state_of / with_state / prio_of, inlined: this runs per delivered message
        state_mask, inflight_bits, delivered_bits, prio_mask = (
            STATE_MASK, INFLIGHT_BITS, DELIVERED_BITS, PRIO_MASK)
        for mid in ids:
            v = msgs.get(mid)
            if v is None:
                continue
            state = v & state_mask
            if state == delivered_bits:
                continue
            if state == inflight_bits:
                for s in mb.inflight.pop(mid):
                    s.inflight.discard(mid)
            else:
                stale += 1  # stays in its deque as a stale entry (see Mailbox)
            msgs[mid] = (v & ~state_mask) | delivered_bits
            store.mark_delivered_at(mb.keys, v & prio_mask, mid)
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

    def _give_back(self, mb: Mailbox, sub: Sub, mids: Iterable[int]) -> None:
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
