"""One NATS client connection: handshake, auth, limits, subscriptions and output batching.

The connection knows nothing about routing or mailboxes: every PUB goes to
``broker.publish`` and every SUB/UNSUB to ``broker.subscribe``/``broker.unsubscribe``; the
broker calls back ``deliver`` for messages. Output is gathered in a list and written once per
event-loop turn (``broker.want_flush``), so a burst of deliveries costs one syscall.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import ParamSpec, Protocol, cast, final

from mq9.config import Config
from mq9.gateway.auth import ConnPerms, User
from mq9.gateway.tls import NotTLS, ServerTLS
from mq9.log import Logger
from mq9.protocol import errors
from mq9.protocol.parser import Parser
from mq9.protocol.subject_syntax import valid_publish_subject, valid_subject
from mq9.subjects import kind_of

PING = b"PING\r\n"
PONG = b"PONG\r\n"
OK = b"+OK\r\n"

P = ParamSpec("P")


class Traffic:
    """What one kind of subject (``subjects.KINDS``) carried through a gateway: plain ints,
    bumped on the publish and delivery paths and folded into the metrics once a second."""

    __slots__ = ("msgs_in", "bytes_in", "msgs_out", "bytes_out")

    def __init__(self) -> None:
        self.msgs_in = 0
        self.bytes_in = 0
        self.msgs_out = 0
        self.bytes_out = 0

    def totals(self) -> tuple[int, int, int, int]:
        return self.msgs_in, self.bytes_in, self.msgs_out, self.bytes_out


_UNCOUNTED = Traffic()  # a subscription's counters until its first delivery picks them


@final  # so that ``type(item) is Subscription`` tells a router's items apart for mypy
class Subscription:
    __slots__ = ("client", "sid", "sid_b", "subject", "queue", "max_msgs", "delivered", "owner", "key",
                 "last_subject", "last_head", "last_kind")

    def __init__(self, client: Client, sid: str, subject: str, queue: str | None, key: int):
        self.client = client
        self.sid = sid
        self.sid_b = sid.encode("utf-8", "surrogateescape")
        self.subject = subject
        self.queue = queue
        self.max_msgs = 0  # 0 = unlimited; set by UNSUB <sid> <max>
        self.delivered = 0
        self.owner: tuple[str, int] | None = None  # (mail_id, priorities) for a mailbox owner sub
        self.key = key  # gateway-unique id, names the sub to shards
        # The last subject delivered, its "MSG <subject> <sid> " and its per-kind counters:
        # a subscriber mostly gets one subject over and over.
        self.last_subject: str | None = None
        self.last_head = b""
        self.last_kind = _UNCOUNTED


class Broker(Protocol):
    """What a connection asks of its gateway (``mq9.gateway.server.Gateway``)."""

    @property
    def cfg(self) -> Config: ...
    @property
    def tls(self) -> ssl.SSLContext | None: ...
    @property
    def auth_required(self) -> bool: ...
    @property
    def log(self) -> Logger: ...
    @property
    def kinds(self) -> list[Traffic]: ...  # by ``subjects.kind_of``

    def admit(self, client: Client) -> bool: ...
    def release(self, client: Client) -> None: ...
    def info_line(self, client: Client, connect_info: bool = False) -> bytes: ...
    def check_auth(self, opts: Mapping[str, object], client: Client) -> bool | None: ...
    def auth_failed(self, kind: str) -> None: ...
    def tls_failed(self, client: Client, exc: BaseException) -> None: ...
    def slow_consumer(self, client: Client) -> None: ...
    def want_flush(self, client: Client) -> None: ...
    def pong_when_routed(self, client: Client) -> None: ...
    def publish(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
                client: Client) -> None: ...
    def publish_run(self, subject: str, replies: list[str | None] | None, payloads: list[bytes],
                    nbytes: int, client: Client) -> None: ...
    def next_key(self) -> int: ...
    def subscribe(self, sub: Subscription) -> None: ...
    def unsubscribe(self, sub: Subscription) -> None: ...


class Client(asyncio.Protocol):
    # Set by connection_made, before anything reads them.
    transport: asyncio.Transport
    _write: Callable[[bytes], None]  # transport.write, or tls.write once TLS is set up

    def __init__(self, broker: Broker, cid: int):
        self.broker = broker
        self.cfg = broker.cfg
        self.cid = cid
        self.parser = Parser(self, self.cfg.max_payload, self.cfg.max_control_line)
        self.subs: dict[str, Subscription] = {}
        self.out: list[bytes] = []
        self.out_size = 0
        self.closed = False
        self.lost_output = False  # set at teardown: queued output was never written
        self.connected = False  # CONNECT received (and authorised)
        # nats-server's defaults for a client that never sends CONNECT.
        self.verbose = True
        self.pedantic = True
        self.info_after_pong = False  # nats-server >= 2.12 repeats INFO after the first PONG
        self.proto = 0  # CONNECT's protocol: 1 means the client takes asynchronous INFOs
        self.echo = True
        self.headers = False
        self.no_responders = False
        self.name = ""
        self.lang = ""
        self.pings_out = 0
        self.rechecks = 0  # no-responders answers still pending for this client
        self.held_pongs: list[Callable[[], None]] | None = None  # PONGs that must wait for them
        self.start = time.time()
        self.last_activity_wall = self.start
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self._auth_timer: asyncio.TimerHandle | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.perms: ConnPerms | None = None  # when the user has permissions
        # What a config reload checks again (see reauth): the credentials of the first
        # CONNECT as given, as nats-server keeps them, and the auth-file user they matched.
        self.creds: dict[str, str] | None = None
        self.user: User | None = None
        # perms.deliverable when deliveries must be filtered
        self.deliver_check: Callable[[str, str | None], bool] | None = None
        self.held_ops: list[Callable[[], None]] | None = None  # ops that arrived while a bcrypt check ran
        self.tls: ServerTLS | None = None
        self.handshaking = False  # TLS handshake under way: nothing may be written yet
        self._tls_timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's is not a subclass of asyncio.Transport).
        transport = self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote = peer[:2]
        # Bounded kernel/uvloop buffering: past this, the pending-bytes check cuts the client.
        transport.set_write_buffer_limits(high=self.cfg.max_pending)
        self._write = transport.write
        if not self.broker.admit(self):
            self.transport.write(self.broker.info_line(self))
            self.close_with_error(errors.MAX_CONNECTIONS_EXCEEDED)
            return
        if self.broker.tls is not None:
            self.tls = ServerTLS(self.broker.tls, transport)
            if not self.cfg.tls_handshake_first:
                transport.write(self.broker.info_line(self))
            self.handshaking = True
            self._tls_timer = asyncio.get_running_loop().call_later(
                self.cfg.tls_timeout, self._tls_failed, TimeoutError("TLS handshake timeout"))
            return
        self.transport.write(self.broker.info_line(self))
        self._start_auth_timer()

    def _start_auth_timer(self) -> None:
        if self.broker.auth_required:
            self._auth_timer = asyncio.get_running_loop().call_later(
                self.cfg.auth_timeout, self._auth_timeout)

    def _tls_data(self, tls: ServerTLS, data: bytes) -> bytes:
        """Socket bytes in, plaintext out (b"" while the handshake goes on)."""
        try:
            data = tls.feed(data)
        except (NotTLS, ssl.SSLError, EOFError, ValueError) as e:
            if self.handshaking:
                self._tls_failed(e)
            else:  # the client ended TLS (close_notify) or sent garbage: like an EOF
                self.close()
            return b""
        except Exception:  # noqa: BLE001 - one connection's TLS must never take the gateway down
            self.broker.log.exception("client_tls_failure", cid=self.cid)
            self.handshaking = False
            self.close()
            return b""
        if self.handshaking and tls.established:
            self.handshaking = False
            if self._tls_timer is not None:
                self._tls_timer.cancel()
                self._tls_timer = None
            self._write = tls.write
            if self.cfg.tls_handshake_first:
                self._write(self.broker.info_line(self))
            self._start_auth_timer()
            if self.out:
                self.flush()
        return data

    def _tls_failed(self, exc: BaseException) -> None:
        """Plain protocol instead of a ClientHello, a certificate that does not verify, a
        timeout: nats-server closes without a NATS word (OpenSSL's alert, if any, was sent)."""
        if self.closed or not self.handshaking:
            return
        self.broker.tls_failed(self, exc)
        self._teardown()
        self.transport.close()  # close, not abort: the alert is still in the buffer

    def data_received(self, data: bytes) -> None:
        self.last_activity_wall = time.time()
        tls = self.tls
        if tls is not None:
            data = self._tls_data(tls, data)
            if not data:
                return
        try:
            self.parser.feed(data)
        except Exception:  # a bug must never reach the client as a traceback or kill the loop
            self.broker.log.exception("client_parser_failure", cid=self.cid)
            self.close_with_error(errors.PARSE_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()

    def eof_received(self) -> bool:
        # The client shut its side: nothing more will come, and the transport closes once
        # its buffer is written. Tear down now, output first, so that nothing is queued
        # (and reported delivered) to a transport that would silently drop it.
        self.close()
        return False

    def pause_writing(self) -> None:
        # The socket buffer is full; data keeps accumulating in ``out`` until max_pending.
        pass

    def resume_writing(self) -> None:
        pass

    # ---- output -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.out:
            self.broker.want_flush(self)
        self.out.append(data)
        self.out_size += len(data)
        if self.out_size > self.cfg.max_pending:
            self._slow_consumer()

    def flush(self) -> None:
        if self.closed or not self.out or self.handshaking:
            return
        out = self.out
        self.out = []
        self.out_size = 0
        self._write(b"".join(out) if len(out) > 1 else out[0])
        if self.transport.get_write_buffer_size() > self.cfg.max_pending:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        # What is queued is still handed to the transport on close: mailbox messages in it
        # were already reported delivered, and the kernel may yet get them to the client.
        self.broker.slow_consumer(self)
        self.close_with_error(errors.SLOW_CONSUMER)

    def _head(self, sub: Subscription, subject: str) -> None:
        sub.last_subject = subject
        sub.last_head = b"MSG %s %s " % (subject.encode("utf-8", "surrogateescape"), sub.sid_b)
        sub.last_kind = self.broker.kinds[kind_of(subject)]

    def deliver(self, sub: Subscription, subject: str, reply: str | None,
                headers: bytes | None, payload: bytes) -> None:
        """Queue one MSG/HMSG for ``sub``. Headers are dropped for clients that did not
        declare header support, as nats-server does."""
        if self.deliver_check is not None and not self.deliver_check(subject, reply):
            return  # a subscribe deny pattern covers this subject (permissions)
        if subject != sub.last_subject:
            self._head(sub, subject)
        size = len(payload)
        if headers is not None and self.headers:
            hl = len(headers)
            if reply:
                line = b"H%s%s %d %d\r\n" % (sub.last_head, reply.encode("utf-8", "surrogateescape"),
                                             hl, hl + size)
            else:
                line = b"H%s%d %d\r\n" % (sub.last_head, hl, hl + size)
            self.send(line + headers + payload + b"\r\n")
        elif reply:
            self.send(b"%s%s %d\r\n%s\r\n" % (sub.last_head, reply.encode("utf-8", "surrogateescape"),
                                                size, payload))
        else:
            self.send(b"%s%d\r\n%s\r\n" % (sub.last_head, size, payload))
        self.msgs_out += 1
        self.bytes_out += size
        k = sub.last_kind
        k.msgs_out += 1
        k.bytes_out += size
        sub.delivered += 1
        if sub.max_msgs and sub.delivered >= sub.max_msgs:
            self._remove_sub(sub)

    def deliver_run(self, sub: Subscription, subject: str, reply: str | None,
                    payloads: list[bytes]) -> None:
        """``deliver`` for several header-less messages: one formatted block, one send."""
        if sub.max_msgs or self.deliver_check is not None:
            # may run out part way (UNSUB <sid> <max>), or be filtered (permissions)
            for p in payloads:
                if self.closed or self.subs.get(sub.sid) is not sub:
                    return
                self.deliver(sub, subject, reply, None, p)
            return
        if subject != sub.last_subject:
            self._head(sub, subject)
        head = sub.last_head
        if reply:
            head += reply.encode("utf-8", "surrogateescape") + b" "
        block = b"".join([b"%s%d\r\n%s\r\n" % (head, len(p), p) for p in payloads])
        n = len(payloads)
        size = sum(map(len, payloads))
        self.send(block)
        self.msgs_out += n
        self.bytes_out += size
        k = sub.last_kind
        k.msgs_out += n
        k.bytes_out += size
        sub.delivered += n

    def describe(self, now: float) -> dict[str, object]:
        """This connection as nats-server's /connz lists it."""
        return {"cid": self.cid, "ip": self.remote[0], "port": self.remote[1],
                "start": self.start, "last_activity": self.last_activity_wall,
                "uptime": round(now - self.start, 3),
                "pending_bytes": self.out_size + (self.transport.get_write_buffer_size()
                                                  if self.transport else 0),
                "in_msgs": self.msgs_in, "out_msgs": self.msgs_out,
                "in_bytes": self.bytes_in, "out_bytes": self.bytes_out,
                "subscriptions": len(self.subs), "name": self.name, "lang": self.lang,
                **self._tls_description()}

    def _tls_description(self) -> dict[str, str]:
        if self.tls is None or not self.tls.established:
            return {}
        version, cipher = self.tls.describe()
        return {"tls_version": version, "tls_cipher_suite": cipher}

    # ---- closing ----------------------------------------------------------------------

    def close_with_error(self, text: str) -> None:
        if self.closed:
            return
        if self.handshaking:  # no TLS yet: nothing can be said
            self.close()
            return
        if self.out:
            self.flush()
        line = errors.err_line(text)
        if line:
            self._write(line)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if self.out and not self.handshaking:
            self.flush()
        if self.tls is not None and not self.handshaking:
            self.tls.close_notify()
        self._teardown()
        self.transport.close()

    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self._tls_timer is not None:
            self._tls_timer.cancel()
        # The peer went away before this loop turn's output was written: what sits in
        # ``out`` never reached the connection (owner subscriptions give it back).
        self.lost_output = bool(self.out)
        for sub in list(self.subs.values()):
            self.broker.unsubscribe(sub)
        self.subs.clear()
        self.out = []
        self.broker.release(self)

    def _auth_timeout(self) -> None:
        if not self.connected:
            self.close_with_error(errors.AUTHENTICATION_TIMEOUT)

    # ---- parser callbacks ------------------------------------------------------------

    def protocol_error(self, text: str) -> None:
        self.close_with_error(text)

    def _require_connect(self, op: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> bool:
        if self.connected or not self.broker.auth_required:
            return True
        if self.held_ops is not None:  # CONNECT is being checked: the op waits for it
            self.held_ops.append(partial(op, *args, **kwargs))
            return False
        self.broker.auth_failed("no_connect")
        self.close_with_error(errors.AUTHORIZATION_VIOLATION)
        return False

    def op_connect(self, args: bytes) -> None:
        if self.held_ops is not None:
            self.held_ops.append(partial(self.op_connect, args))
            return
        try:
            opts = json.loads(args)
            if not isinstance(opts, dict):
                raise ValueError
        except ValueError:
            self.close_with_error(errors.INVALID_CONNECT)
            return
        # Like nats-server, a CONNECT changes only the options it names.
        self.verbose = bool(opts.get("verbose", self.verbose))
        self.pedantic = bool(opts.get("pedantic", self.pedantic))
        self.echo = bool(opts.get("echo", self.echo))
        self.headers = bool(opts.get("headers", self.headers))
        self.no_responders = bool(opts.get("no_responders", self.no_responders))
        proto = opts.get("protocol", 0)
        if isinstance(proto, int) and proto > 1:
            self.close_with_error(errors.INVALID_CLIENT_PROTOCOL)
            return
        if isinstance(proto, int) and proto >= 1 and not self.connected:
            self.info_after_pong = True
        if isinstance(proto, int):
            self.proto = proto
        if self.no_responders and not self.headers:
            self.close_with_error(errors.NO_RESPONDERS_REQUIRES_HEADERS)
            return
        self.name = str(opts.get("name", "") or "")
        self.lang = str(opts.get("lang", "") or "")
        if not self.connected:
            self.creds = {k: v for k in ("user", "pass", "auth_token")
                          if isinstance(v := opts.get(k), str)} or None
        if self.broker.auth_required and not self.connected:
            ok = self.broker.check_auth(opts, self)
            if ok is None:
                # A bcrypt check runs in a thread; the ops after CONNECT wait for it
                # (reading pauses, so they are at most what was read already).
                self.held_ops = []
                self.transport.pause_reading()
                return
            self._authorised(ok)
            return
        self.connected = True
        if self.verbose:
            self.send(OK)

    def _authorised(self, ok: bool) -> None:
        if not ok:
            self.broker.auth_failed("credentials")
            self.close_with_error(errors.AUTHORIZATION_VIOLATION)
            return
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.connected = True
        self._set_deliver_check()
        if self.verbose:
            self.send(OK)

    def _set_deliver_check(self) -> None:
        perms = self.perms
        self.deliver_check = perms.deliverable if perms is not None and perms.perms.checks_delivery else None

    def reauthorised(self, user: User | None, perms: ConnPerms | None) -> int:
        """A config reload kept this connection: ``perms`` (auth.ConnPerms or None) replace
        its permissions, and each subscription they no longer allow is removed with
        nats-server's -ERR naming its sid. Returns how many were removed."""
        old = self.perms
        if old is not None and perms is not None and old.replies is not None and perms.replies is not None:
            perms.replies = old.replies  # requests it was delivered may still be answered
        self.user = user
        self.perms = perms
        self._set_deliver_check()
        if perms is None:
            return 0
        removed = 0
        for sub in list(self.subs.values()):
            if not perms.may_subscribe(sub.subject, sub.queue):
                self._remove_sub(sub)
                self.send(errors.err_line(errors.subscription_removed(sub.subject, sub.queue, sub.sid)))
                removed += 1
        return removed

    def auth_done(self, ok: bool) -> None:
        """The answer of a bcrypt check that ``broker.check_auth`` started."""
        held, self.held_ops = self.held_ops, None
        if self.closed:
            return
        self._authorised(ok)
        if self.closed:
            return
        self.transport.resume_reading()
        for op in held or ():
            if self.closed:
                break
            op()

    def op_ping(self) -> None:
        if not self.connected and not self._require_connect(self.op_ping):
            return
        self.broker.pong_when_routed(self)

    def op_pong(self) -> None:
        self.pings_out = 0

    def op_pub(self, subject: str, reply: str | None, payload: bytes) -> None:
        self._publish(subject, reply, None, payload)

    def op_pubs(self, subject: str, replies: list[str | None] | None, payloads: list[bytes]) -> None:
        """A run of PUBs to one subject (see ``Parser``); ``replies`` None or one each."""
        perms = self.perms
        if self.verbose or not self.connected or (
                self.pedantic and not valid_publish_subject(subject)) or (
                perms is not None and not perms.pub_cache.get(subject)
                and not perms.perms.publish_allowed(subject)):
            # +OK or -ERR per message, each before what that message produces (a reply
            # the user may only send as a response is checked message by message too)
            for i, p in enumerate(payloads):
                if self.closed:
                    return
                self._publish(subject, None if replies is None else replies[i], None, p)
            return
        nbytes = sum(map(len, payloads))
        self.msgs_in += len(payloads)
        self.bytes_in += nbytes
        self.broker.publish_run(subject, replies, payloads, nbytes, self)

    def op_hpub(self, subject: str, reply: str | None, headers: bytes, payload: bytes) -> None:
        if not self.headers:
            self.close_with_error(errors.HEADERS_NOT_SUPPORTED)
            return
        # An empty header block is a plain message, as nats-server delivers it.
        self._publish(subject, reply, headers or None, payload)

    def _publish(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes) -> None:
        if not self.connected and not self._require_connect(self._publish, subject, reply, headers, payload):
            return
        if self.pedantic and not valid_publish_subject(subject):
            # nats-server complains and still delivers the message.
            self.send(errors.err_line(errors.INVALID_PUBLISH_SUBJECT))
        self.msgs_in += 1
        self.bytes_in += len(payload)
        perms = self.perms
        if perms is not None and not perms.pub_cache.get(subject) and not perms.may_publish(subject):
            # nats-server: no +OK, the message is dropped, the connection stays.
            self.send(errors.err_line(errors.permissions_violation_publish(subject)))
            return
        if self.verbose:
            self.send(OK)  # before any MSG this PUB produces on the same connection
        self.broker.publish(subject, reply, headers, payload, self)

    def op_sub(self, subject: str, queue: str | None, sid: str) -> None:
        if not self.connected and not self._require_connect(self.op_sub, subject, queue, sid):
            return
        # nats-server's order: permissions, the subscription limit, a reused sid, the subject.
        if self.perms is not None and not self.perms.may_subscribe(subject, queue):
            self.send(errors.err_line(errors.permissions_violation_subscribe(subject, queue)))
            return
        if self.cfg.max_subscriptions and len(self.subs) >= self.cfg.max_subscriptions:
            self.send(errors.err_line(errors.MAX_SUBSCRIPTIONS_EXCEEDED))
            return
        if sid in self.subs:
            # nats-server keeps the first subscription for a reused sid, before any check.
            if self.verbose:
                self.send(OK)
            return
        if not valid_subject(subject):
            self.send(errors.err_line(errors.INVALID_SUBJECT))
            return
        sub = Subscription(self, sid, subject, queue, self.broker.next_key())
        self.subs[sid] = sub
        self.broker.subscribe(sub)
        if self.verbose:
            self.send(OK)

    def op_unsub(self, sid: str, max_msgs: int | None) -> None:
        if not self.connected and not self._require_connect(self.op_unsub, sid, max_msgs):
            return
        sub = self.subs.get(sid)
        if sub is not None:
            if max_msgs and max_msgs > sub.delivered:
                sub.max_msgs = max_msgs
            else:
                self._remove_sub(sub)
        if self.verbose:
            self.send(OK)

    def _remove_sub(self, sub: Subscription) -> None:
        if self.subs.pop(sub.sid, None) is not None:
            self.broker.unsubscribe(sub)
