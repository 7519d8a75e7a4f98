"""The operator's list of mailboxes, the shard's side (``ListMailboxes``, asked by
``mq9.mailbox_list``): counts and times of a page of mailboxes, never a token or message."""

from __future__ import annotations

from mq9 import subjects, wire
from mq9.api import Code
from mq9.shard.core import ShardCore
from mq9.shard.state import DELIVERED, Mailbox, prio_of, state_of
from mq9.shard.state import refusal as _err

# The operator's list (ListMailboxes) runs inside a batch, so one page is bounded in work,
# not only in items: it stops early (``more``) after this many mailbox keys looked at or
# stored messages counted, and the caller asks again from where it stopped.
LIST_MAX = 1000
LIST_SCAN = 20_000
LIST_COUNT = 200_000


class Listing(ShardCore):
    """The ``Shard``'s handler of ``ListMailboxes``."""

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
        unread = [0, 0, 0]  # per priority index
        if mb.undelivered:
            for v in mb.msgs.values():
                if state_of(v) != DELIVERED:
                    unread[prio_of(v)] += 1
        meta = mb.meta
        g = self.groups.get(mb.mail_id)
        return wire.MailboxInfo(mb.mail_id, meta.type, meta.created, meta.expires_at, meta.ttl,
                                (unread[0], unread[1], unread[2]), len(mb.msgs), mb.nbytes, len(g.subs) if g else 0)
