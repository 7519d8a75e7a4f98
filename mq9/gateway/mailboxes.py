"""mq9 requests at the gateway: MAILBOX.CREATE / QUERY / DELETE, INBOX sends and owner
subscriptions, turned into wire operations for the shard that owns the mailbox.

Request bodies are validated here by ``mq9.api`` before anything reaches a shard; every
failure is an ``api.Error`` reply. Replies are published like any message, so a requester
on another gateway gets them through normal routing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import msgspec

from mq9 import api, metrics, subjects, wire
from mq9.api import BadRequest, error_body
from mq9.cluster.slots import ShardId
from mq9.config import Config
from mq9.gateway.client import Client, Subscription
from mq9.gateway.router import Router
from mq9.gateway.shardlink import Answer, ShardLink

_INBOX_CACHE = 65536  # parsed INBOX subjects kept (a send to a known mailbox skips parsing)
_encode = api.encode


def token_hash(token: str) -> bytes:
    # surrogatepass: JSON may carry a lone surrogate; it is simply a wrong token.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class _RandomPool:
    """Bytes from ``os.urandom`` fetched 4 KiB at a time and each handed out once: a mailbox
    create needs 31 random bytes, and two getrandom calls per create were ~8% of a gateway."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self.buf = os.urandom(max(self.size, n))
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


_random = _RandomPool()


def new_mail_id() -> str:
    # 120 random bits in lowercase hex (SPEC: base32 or hex): unguessable, a valid single
    # NATS token, and ~10x cheaper to make than base64.b32encode's pure-Python loop.
    return "m-" + _random.take(15).hex()


def new_token() -> str:
    return "tok-" + _random.take(16).hex()  # 128 random bits


class Inbox(msgspec.Struct):
    """A valid INBOX subject, parsed once and remembered."""

    subject: str
    priority: str
    ack_head: bytes  # the send ack's JSON around its msg_id (``api.send_ack_template``)
    ack_tail: bytes
    mail_id: str


# What a send's answer is handled with: reply subject, start time, the parsed subject, the
# message's headers and payload; for a run, the reply subjects (None: none has one), start
# time, the parsed subject and the payloads. Tuples: one is made per request, and unpacked.
_SendArg = tuple[str | None, float, Inbox, bytes | None, bytes]
_SendRunArg = tuple[list[str | None] | None, float, Inbox, list[bytes]]


class Mailboxes:
    def __init__(self, cfg: Config, link: ShardLink, router: Router):
        self.cfg = cfg
        self.link = link
        self.router = router
        self.owner_subs: dict[int, Subscription] = {}
        self.sub_target: dict[int, ShardId] = {}  # key -> the shard its Subscribe went to
        self._ack_times: list[float] = []  # observed into the histogram once a second
        # Delivered reports, batched per (shard, key, mail_id) and flushed with the frame.
        self._acks: dict[tuple[ShardId, int, str], list[int]] = {}
        self._inboxes: dict[str, Inbox] = {}  # INBOX subject -> parsed

    # ---- publishes on $mq9.AI.* -----------------------------------------------------

    def handle(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
               client: Client) -> bool:
        """Returns True if the publish was an mq9 operation (consumed here)."""
        if subject.startswith(subjects.INBOX):
            self._send(subject, reply, headers, payload)
            return True
        if not subject.startswith(subjects.MAILBOX):
            return False
        try:
            if subject == subjects.MAILBOX_CREATE:
                self._create(reply, payload)
            elif subject.startswith(subjects.MAILBOX_QUERY):
                self._query(subject[len(subjects.MAILBOX_QUERY):], reply, payload)
            elif subject.startswith(subjects.MAILBOX_DELETE):
                self._delete(subject[len(subjects.MAILBOX_DELETE):], reply, payload)
            else:
                raise BadRequest(api.UNKNOWN_OPERATION)
        except BadRequest as e:
            self._error(reply, api.Code.BAD_REQUEST, str(e))
        # Watchers of '$mq9.AI.#' see requests too (without the reply subject, so a watcher
        # can never answer in the broker's place); INBOX sends reach them once stored.
        self.router.route(subject, None, headers, payload, client)
        return True

    def handle_run(self, subject: str, replies: list[str | None] | None, payloads: list[bytes],
                   client: Client) -> bool:
        """``handle`` for header-less publishes in a row to one subject: INBOX sends go to
        the shard as one request, other mailbox operations are one request each."""
        if subject.startswith(subjects.INBOX):
            self.send_run(subject, replies, payloads)
            return True
        if not subject.startswith(subjects.MAILBOX):
            return False
        for i, p in enumerate(payloads):
            self.handle(subject, None if replies is None else replies[i], None, p, client)
        return True

    def _error(self, reply: str | None, code: str, text: str) -> None:
        if reply:
            self.router.route(reply, None, None, error_body(code, text), None)

    def _answer(self, reply: str | None) -> Callable[[Answer, None], None]:
        def done(res: Answer, _arg: None) -> None:
            if not reply:
                return
            if res.code:
                self.router.route(reply, None, None, error_body(res.code, res.error or res.code), None)
            elif type(res) is wire.Result:
                self.router.route(reply, None, None, _encode(res.data or {}), None)
        return done

    def _create(self, reply: str | None, payload: bytes) -> None:
        req = api.create_request(payload, self.cfg.default_ttl)
        auto = req.name is None
        self._do_create(reply, new_mail_id() if req.name is None else req.name, req.type, req.ttl,
                        new_token(), auto, attempts=3)

    def _do_create(self, reply: str | None, name: str, mtype: str, ttl: int, token: str, auto: bool,
                   attempts: int) -> None:
        def done(res: Answer, _arg: None) -> None:
            if res.code == api.Code.EXISTS and auto and attempts > 1:
                # 120 random bits make this all but impossible; retry rather than fail.
                self._do_create(reply, new_mail_id(), mtype, ttl, token, auto, attempts - 1)
                return
            if not reply:
                return
            if res.code:
                self.router.route(reply, None, None, error_body(res.code, res.error or res.code), None)
            elif type(res) is wire.Result:
                self.router.route(reply, None, None, _encode(api.Created(**(res.data or {}), token=token)), None)

        rid = self.link.next_rid()
        op = wire.Create(rid=rid, mail_id=name, type=mtype, ttl=ttl, token_hash=token_hash(token), auto=auto)
        self.link.request(self.link.shard_of(name), op, done, None)

    def _query(self, mail_id: str, reply: str | None, payload: bytes) -> None:
        req = api.query_request(payload, mail_id)
        rid = self.link.next_rid()
        op = wire.Query(rid=rid, mail_id=mail_id, token_hash=token_hash(req.token),
                        limit=req.limit, mark_read=req.mark_read)
        self.link.request(self.link.shard_of(mail_id), op, self._answer(reply), None)

    def _delete(self, mail_id: str, reply: str | None, payload: bytes) -> None:
        req = api.delete_request(payload, mail_id)
        rid = self.link.next_rid()
        op = wire.Delete(rid=rid, mail_id=mail_id, token_hash=token_hash(req.token))
        self.link.request(self.link.shard_of(mail_id), op, self._answer(reply), None)

    def _inbox(self, subject: str, reply: str | None) -> Inbox | None:
        """The parsed INBOX subject (see ``_parse_inbox``), or None after answering why not."""
        target = self._inboxes.get(subject)
        if target is None:
            parsed = self._parse_inbox(subject)
            if isinstance(parsed, str):
                if parsed == "bad_subject":
                    metrics.DROPS.labels("bad_subject").inc()
                    self._error(reply, api.Code.BAD_REQUEST, api.BAD_INBOX_SUBJECT)
                else:
                    self._error(reply, api.Code.BAD_REQUEST, parsed)
                return None
            target = parsed
        return target

    def _send(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes) -> None:
        target = self._inbox(subject, reply)
        if target is None:
            return
        mail_id = target.mail_id
        op = wire.Send(rid=self.link.next_rid(), mail_id=mail_id, priority=target.priority,
                       subject=subject, payload=payload, headers=headers)
        arg: _SendArg = (reply, time.perf_counter() if reply else 0.0, target, headers, payload)
        self.link.request(self.link.shard_of(mail_id), op, self._sent, arg)

    def send_run(self, subject: str, replies: list[str | None] | None, payloads: list[bytes]) -> None:
        """Header-less sends in a row to one INBOX subject: one request to the shard."""
        target = self._inbox(subject, None)
        if target is None:
            for reply in replies or ():
                if reply:
                    self._inbox(subject, reply)  # the same error, to each requester
            return
        mail_id = target.mail_id
        op = wire.SendRun(rid=self.link.next_rid(), mail_id=mail_id, priority=target.priority,
                          subject=subject, payloads=payloads)
        arg: _SendRunArg = (replies, time.perf_counter(), target, payloads)
        self.link.request(self.link.shard_of(mail_id), op, self._sent_run, arg)

    def _sent_run(self, res: Answer, arg: _SendRunArg) -> None:
        replies, t0, target, payloads = arg
        if type(res) is not wire.SentRun:  # refused as a whole (not_found, moved too long, unavailable, ...)
            code = res.code or api.Code.INTERNAL
            body = error_body(code, res.error or code)
            if replies is None:
                metrics.DROPS.labels(code).inc(len(payloads))
                return
            for reply in replies:
                if reply:
                    self.router.route(reply, None, None, body, None)
                else:
                    metrics.DROPS.labels(code).inc()
            return
        subject, priority, ack_head, ack_tail = target.subject, target.priority, target.ack_head, target.ack_tail
        results = res.results
        if replies is not None:
            dt = time.perf_counter() - t0
            times = self._ack_times
            for reply, r in zip(replies, results):
                if not reply:
                    continue
                if type(r) is int:
                    times.append(dt)
                    self.router.route(reply, None, None, b"%s%d%s" % (ack_head, r, ack_tail), None)
                elif type(r) is tuple:  # (code, text): not stored
                    code, text = r
                    self._error(reply, code, text)
        if self.router.has_interest(subject):  # monitors see what was stored
            for r, payload in zip(results, payloads):
                if type(r) is int:
                    self.router.route(subject, None, _with_mq9_headers(None, r, priority),
                                      payload, None)

    def _sent(self, res: Answer, arg: _SendArg) -> None:
        """The shard's answer to a send (``arg``: see ``_SendArg``)."""
        reply, t0, target, headers, payload = arg
        if type(res) is not wire.Sent:  # a Result that says why not
            code = res.code or api.Code.INTERNAL
            if not reply:
                metrics.DROPS.labels(code).inc()
            self._error(reply, code, res.error or code)
            return
        if reply:
            self._ack_times.append(time.perf_counter() - t0)
            self.router.route(reply, None, None, b"%s%d%s" % (target.ack_head, res.msg_id, target.ack_tail),
                              None)
        # Monitors (wildcard subscriptions) see the message once it is stored.
        subject = target.subject
        if self.router.has_interest(subject):
            self.router.route(subject, None, _with_mq9_headers(headers, res.msg_id, target.priority),
                              payload, None)

    def _parse_inbox(self, subject: str) -> Inbox | str:
        """The ``Inbox`` of a valid INBOX subject, remembered; else the error text
        ("bad_subject" for a malformed one)."""
        parsed = subjects.parse_inbox(subject)
        if parsed is None or not subjects.valid_mail_id(parsed[0]):
            return "bad_subject"
        mail_id, priority = parsed
        why = api.check_priority(priority)
        if why:
            return why
        if len(self._inboxes) >= _INBOX_CACHE:
            self._inboxes.clear()  # unique subjects at this rate are not worth evicting one by one
        head, tail = api.send_ack_template(mail_id, priority)
        target = self._inboxes[subject] = Inbox(subject, priority, head, tail, mail_id)
        return target

    # ---- owner subscriptions --------------------------------------------------------

    def subscribe(self, sub: Subscription, owner: tuple[str, int]) -> None:
        sub.owner = owner
        self.owner_subs[sub.key] = sub
        mail_id, prios = owner
        target = self.sub_target[sub.key] = self.link.shard_of(mail_id)
        self.link.post(target, wire.Subscribe(key=sub.key, mail_id=mail_id, priorities=prios,
                                              queue=sub.queue))

    def unsubscribe(self, sub: Subscription) -> None:
        if self.owner_subs.pop(sub.key, None) is None or sub.owner is None:
            return
        mail_id, _ = sub.owner
        shard = self.sub_target.pop(sub.key)
        if sub.client.lost_output:
            # Queued to the connection this turn but never written (the peer closed first):
            # not delivered, whatever the pending report says. Possibly some of them were
            # written earlier in the turn: then they come again (a duplicate, never a loss).
            ids = self._acks.pop((shard, sub.key, mail_id), None)
            if ids:
                self.link.post(shard, wire.Undelivered(key=sub.key, mail_id=mail_id, msg_ids=ids))
        self.flush_acks()  # Delivered before Unsubscribe, so the shard counts them first
        self.link.post(shard, wire.Unsubscribe(key=sub.key, mail_id=mail_id))

    def on_shard_connected(self, shard: ShardId) -> None:
        """Connected again: a restarted shard knows none of our subscriptions; one that only
        lost the connection keeps them, and an identical Subscribe changes nothing there."""
        for sub in self.owner_subs.values():
            if sub.owner is None:
                continue
            mail_id, prios = sub.owner
            if self.sub_target[sub.key] == shard:
                self.link.post(shard, wire.Subscribe(key=sub.key, mail_id=mail_id,
                                                     priorities=prios, queue=sub.queue))

    def on_topology_changed(self) -> None:
        """Slots moved: owner subscriptions follow their mailbox to its new shard (the old
        one froze the slot and pushes nothing more)."""
        for sub in self.owner_subs.values():
            if sub.owner is None:
                continue
            mail_id, prios = sub.owner
            target = self.link.shard_of(mail_id)
            if target != self.sub_target[sub.key]:
                self.sub_target[sub.key] = target
                self.link.post(target, wire.Subscribe(key=sub.key, mail_id=mail_id,
                                                      priorities=prios, queue=sub.queue))

    def on_deliver_run(self, d: wire.DeliverRun) -> None:
        sub = self.owner_subs.get(d.key)
        ids = d.msg_ids
        if sub is None or sub.client.closed:
            self.link.post(self.link.shard_of(d.mail_id),
                           wire.Undelivered(key=d.key, mail_id=d.mail_id, msg_ids=ids))
            return
        k = (self.sub_target[d.key], d.key, d.mail_id)
        acks = self._acks.get(k)
        if acks is None:
            if not self._acks:
                self.link.loop.call_soon(self.flush_acks)
            acks = self._acks[k] = []
        client, subject, prio = sub.client, d.subject, d.priority
        hs, payloads, owner_subs, key = d.headers, d.payloads, self.owner_subs, d.key
        for i, mid in enumerate(ids):
            if client.closed or owner_subs.get(key) is not sub:
                # cut off (slow consumer) or unsubscribed (UNSUB max) part way
                self.link.post(self.link.shard_of(d.mail_id),
                               wire.Undelivered(key=key, mail_id=d.mail_id, msg_ids=ids[i:]))
                return
            acks.append(mid)
            client.deliver(sub, subject, None,
                           _with_mq9_headers(hs[i] if hs else None, mid, prio), payloads[i])

    def report(self) -> None:
        """Once a second: send-ack latencies into the shared histogram (a locked file write
        per observation is too dear per message)."""
        times, self._ack_times = self._ack_times, []
        metrics.observe_many(metrics.SEND_ACK_SECONDS, times)

    def flush_acks(self) -> None:
        if not self._acks:
            return
        acks = self._acks
        self._acks = {}
        for (shard, key, mail_id), ids in acks.items():
            self.link.post(shard, wire.Delivered(key=key, mail_id=mail_id, msg_ids=ids))


def _with_mq9_headers(headers: bytes | None, msg_id: int, priority: str) -> bytes:
    extra = b"Mq9-Msg-Id: %d\r\nMq9-Priority: %s\r\n\r\n" % (msg_id, priority.encode())
    if headers and headers.endswith(b"\r\n\r\n"):
        return headers[:-2] + extra
    return b"NATS/1.0\r\n" + extra
