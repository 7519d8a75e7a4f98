"""Clients' operations on a shard's mailboxes: Create, Send and SendRun, Query, Delete,
answered with the codes and texts of ``mq9.api``."""

from __future__ import annotations

import heapq
import hmac

from mq9 import api, subjects, wire
from mq9.api import Code
from mq9.shard.core import ShardCore
from mq9.shard.state import (
    DELIVERED,
    INFLIGHT,
    NO_PENDING,
    PRIO_BITS,
    PRIO_INDEX,
    PRIORITIES,
    SIZE_SHIFT,
    Mailbox,
    prio_of,
    size_of,
    state_of,
)
from mq9.shard.state import refusal as _err
from mq9.shard.store import Meta, encode_record

# Payload bytes one Query reply may carry: 1000 messages of 1 MiB must not become a
# 1 GiB reply.
QUERY_BYTES = 8 * 1024 * 1024


# What one message of a send became: its msg_id, or (code, text) of the refusal (as a
# ``SentRun`` carries it).
Stored = int | tuple[str, str]


class Operations(ShardCore):
    """The ``Shard``'s handlers of client operations."""

    def _check_token(self, mb: Mailbox, token_hash: bytes) -> bool:
        return bool(token_hash) and hmac.compare_digest(mb.meta.token_hash, token_hash)

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
        mb, prio = target
        r = self._store_message(mb, prio, op.subject, op.headers, op.payload)
        if isinstance(r, int):
            out = self.out.get(gw)
            if out is None:
                out = self.out[gw] = []
            out.append(wire.Sent(op.rid, op.mail_id, r, op.priority))
        else:
            code, text = r
            self._reply(gw, _err(op.rid, code, text))

    def _send_run(self, gw: bytes, op: wire.SendRun) -> None:
        target = self._send_target(gw, op)
        if target is None:
            return
        mb, prio = target
        store, subject = self._store_message, op.subject
        self._reply(gw, wire.SentRun(op.rid, [store(mb, prio, subject, None, p)
                                              for p in op.payloads]))

    def _send_target(self, gw: bytes, op: wire.Send | wire.SendRun) -> tuple[Mailbox, int] | None:
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
            self._reply(gw, _err(op.rid, Code.BAD_REQUEST, api.UNKNOWN_PRIORITY.format(op.priority)))
            return None
        return mb, prio

    def _store_message(self, mb: Mailbox, prio: int, subject: str, headers: bytes | None,
                       payload: bytes) -> Stored:
        """Store one message; its msg_id, or (code, text) if the mailbox is full."""
        store = self.store
        msgs = mb.msgs
        mail_id = mb.mail_id
        if mb.latest:
            for old in list(msgs):
                self._remove_message(mb, old)
            if mb.pending is not NO_PENDING:
                for dq in mb.pending:
                    dq.clear()  # only stale ids are left in them
        elif len(msgs) >= self.max_msgs:
            over = len(msgs) - self.max_msgs + 1
            if len(mb.delivered) < over:
                self._count("send", Code.FULL)
                return (Code.FULL, api.FULL.format(mail_id, self.max_msgs))
            for _ in range(over):
                old = heapq.heappop(mb.delivered)
                size = size_of(msgs.pop(old))
                mb.nbytes -= size
                self.total_bytes -= size
                self.total_msgs -= 1
                store.delete_message(mail_id, old, None)
        msg_id = mb.next_id
        mb.next_id = msg_id + 1
        ts = self.now_ms
        size = len(payload)
        store.put_message_at(mb.keys, msg_id, prio, encode_record(prio, ts, subject, headers, payload))
        self.fresh[(mail_id, msg_id)] = (prio, ts, subject, headers, payload)
        msgs[msg_id] = size << SIZE_SHIFT | prio  # state.pack(size, PENDING, prio), inlined: per send
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
        state = state_of(v)
        if state == DELIVERED:
            mb.delivered.remove(mid)
            heapq.heapify(mb.delivered)
            self.store.delete_message(mb.mail_id, mid, None)
        else:
            mb.undelivered -= 1
            if state == INFLIGHT:
                for s in mb.inflight.pop(mid):
                    s.inflight.discard(mid)
            self.store.delete_message(mb.mail_id, mid, prio_of(v))
        mb.nbytes -= size_of(v)
        self.total_bytes -= size_of(v)
        self.total_msgs -= 1
        self.fresh.pop((mb.mail_id, mid), None)

    def _authorized(self, gw: bytes, op: wire.Query | wire.Delete, name: str) -> Mailbox | None:
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
        messages: list[api.Message] = []
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
