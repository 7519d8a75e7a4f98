"""A small, fast asyncio NATS client speaking the raw protocol, for load generation.

It is deliberately not nats-py: a load generator must be much cheaper per message than the
broker it measures, so this client

- writes through an ``asyncio.Protocol`` (no streams), batching every PUB/HPUB queued during
  one event-loop turn into a single ``transport.write``; pre-built frames can be written
  as they are (``write_raw``),
- parses MSG/HMSG/PING/PONG/+OK/-ERR/INFO with ``bytes.find``/``split`` on whole chunks,
- has a count-only fast path: a subscription without a callback only counts, and while the
  next control line is byte-identical to the previous one for that subscription (the usual
  case for a stream of same-size messages on one subject) the frame length is reused with a
  single ``startswith`` per message instead of a parse,
- does request/reply through one ``_INBOX.<random>.*`` subscription, as client libraries do.

Use it under uvloop (``install_uvloop()``). Typical use::

    nc = await connect("127.0.0.1", 4222)
    sub = nc.subscribe("bench.x", target=100_000)     # count only
    await nc.flush()
    frame = build_pub("bench.x", b"x" * 128)
    nc.write_raw(frame * 1000)
    await sub.wait(10.0)
    reply = await nc.request("svc", b"ping")
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import ssl

__all__ = [
    "Client",
    "Msg",
    "NatsError",
    "NoResponders",
    "Subscription",
    "build_hpub",
    "build_pub",
    "connect",
    "encode_headers",
    "install_uvloop",
    "parse_headers",
]

CRLF = b"\r\n"
_PING = b"PING\r\n"
_PONG = b"PONG\r\n"
MAX_CONTROL_LINE = 64 * 1024


def install_uvloop() -> bool:
    """Make new event loops uvloop loops; False when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class NatsError(Exception):
    """A ``-ERR`` from the server, a closed connection or a protocol error."""


class NoResponders(NatsError):
    """A request got the 503 status message: nobody is subscribed to the subject."""


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


# Headers as given to a publish: a dict of names and values, or an encoded block.
Headers = dict[str, object] | bytes


def encode_headers(headers: Headers | None) -> bytes:
    """``{"K": "v"}`` -> ``NATS/1.0\\r\\nK: v\\r\\n\\r\\n`` (bytes pass through)."""
    if headers is None:
        return b""
    if isinstance(headers, (bytes, bytearray)):
        return bytes(headers)
    out = [b"NATS/1.0\r\n"]
    for k, v in headers.items():
        out.append(_b(k) + b": " + _b(str(v)) + CRLF)
    out.append(CRLF)
    return b"".join(out)


def parse_headers(raw: bytes | None) -> tuple[int | None, dict[str, str]]:
    """Header block -> (status code or None, {name: value}); last value wins."""
    if not raw:
        return None, {}
    lines = raw.split(CRLF)
    first = lines[0]
    status = None
    if len(first) > 9 and first.startswith(b"NATS/1.0 "):
        try:
            status = int(first[9:12])
        except ValueError:
            status = None
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(b":")
        hdrs[k.decode().strip()] = v.decode().strip()
    return status, hdrs


def build_pub(subject: str | bytes, payload: bytes, reply: str | bytes | None = None) -> bytes:
    """One complete PUB frame, to be written (or repeated) with ``write_raw``."""
    if reply:
        return b"PUB %s %s %d\r\n%s\r\n" % (_b(subject), _b(reply), len(payload), payload)
    return b"PUB %s %d\r\n%s\r\n" % (_b(subject), len(payload), payload)


def build_hpub(subject: str | bytes, headers: Headers, payload: bytes,
               reply: str | bytes | None = None) -> bytes:
    """One complete HPUB frame."""
    hdr = encode_headers(headers)
    total = len(hdr) + len(payload)
    if reply:
        return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (_b(subject), _b(reply), len(hdr), total,
                                                 hdr, payload)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (_b(subject), len(hdr), total, hdr, payload)


class Msg:
    __slots__ = ("headers", "payload", "reply", "subject")

    def __init__(self, subject: bytes, reply: bytes | None, headers: bytes | None,
                 payload: bytes):
        self.subject = subject
        self.reply = reply
        self.headers = headers
        self.payload = payload

    def json(self) -> Any:
        """The payload decoded as JSON: its shape is the responder's."""
        return json.loads(self.payload)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Msg({self.subject!r}, reply={self.reply!r}, {len(self.payload)} B)"


# A message callback: cb(subject, reply, headers, payload), all bytes (reply/headers may be None).
MsgCallback = Callable[[bytes, "bytes | None", "bytes | None", bytes], None]
# A response callback: cb(headers, payload).
ResponseCallback = Callable[["bytes | None", bytes], None]


class Subscription:
    """A SUB. Without ``cb`` it only counts (fast path); ``wait``/``wait_count`` block until
    ``target``/a given count of messages arrived. ``first``/``last`` are the
    ``time.perf_counter()`` readings at the first and the latest received chunk."""

    __slots__ = (
        "_waiters",
        "active",
        "cb",
        "client",
        "count",
        "first",
        "last",
        "queue",
        "sid",
        "subject",
        "target",
    )

    def __init__(self, client: Client, sid: bytes, subject: str, queue: str | None,
                 cb: MsgCallback | None, target: int | None):
        self.client = client
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self.cb = cb
        self.count = 0
        self.target = target
        self.first = 0.0
        self.last = 0.0
        self.active = True
        self._waiters: list[tuple[int, asyncio.Future[int]]] = []

    def _add(self, n: int) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.last = now
        self.count += n
        if self._waiters:
            c = self.count
            keep = []
            for want, fut in self._waiters:
                if c >= want:
                    if not fut.done():
                        fut.set_result(c)
                else:
                    keep.append((want, fut))
            self._waiters = keep

    def wait_count(self, n: int) -> asyncio.Future[int]:
        """A future resolved with the count once at least ``n`` messages have arrived."""
        fut: asyncio.Future[int] = self.client._loop.create_future()
        if self.count >= n:
            fut.set_result(self.count)
        else:
            self._waiters.append((n, fut))
        return fut

    async def wait(self, timeout: float) -> bool:
        """Wait for ``target`` messages; False on timeout or a closed connection."""
        if self.target is None:
            raise ValueError("subscription has no target")
        fut = self.wait_count(self.target)
        either: list[asyncio.Future[Any]] = [fut, self.client._closed]
        try:
            done, _ = await asyncio.wait(either, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not fut.done():
                fut.cancel()
        return fut in done and not fut.cancelled()

    def unsubscribe(self, max_msgs: int | None = None) -> None:
        self.client.unsubscribe(self, max_msgs)


class Client(asyncio.Protocol):
    """One NATS connection. Create it with :func:`connect`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, headers: bool, echo: bool,
                 no_responders: bool, verbose: bool, pedantic: bool, auth: dict[str, str],
                 write_high: int):
        self._loop = loop
        self._name = name
        self._opts: dict[str, object] = {
            "verbose": verbose, "pedantic": pedantic, "tls_required": False, "name": name,
            "lang": "python-rawnats", "version": "0.1", "protocol": 1, "echo": echo,
            "headers": headers, "no_responders": no_responders and headers, **auth,
        }
        self._write_high = write_high
        self.transport: asyncio.Transport | None = None
        self.info: dict[str, Any] = {}  # the server's INFO, as decoded JSON
        self.errors: list[str] = []
        self.on_error: Callable[[str], None] | None = None
        self._info_fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        # resolved with the error that closed the connection
        self._closed: asyncio.Future[NatsError] = loop.create_future()
        self._pongs: list[asyncio.Future[None]] = []
        self._wbuf: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self._buf = bytearray()
        self._need = 0
        self._subs: dict[bytes, Subscription] = {}
        self._next_sid = 0
        self._fast_line = b""  # set with _fast_sub
        self._fast_len = 0
        self._fast_sub: Subscription | None = None
        self._resp_prefix: bytes | None = None
        self._resp_prefix_len = 0
        self._resp_map: dict[bytes, asyncio.Future[Msg] | ResponseCallback] = {}
        self._next_token = 0
        self.bytes_in = 0
        self.msgs_in = 0
        self._connected = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream connection's transport (uvloop's need not subclass asyncio.Transport)
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        transport.set_write_buffer_limits(high=self._write_high)

    def connection_lost(self, exc: Exception | None) -> None:
        err = NatsError(f"connection closed{': ' + str(exc) if exc else ''}"
                        + (f" (last -ERR {self.errors[-1]})" if self.errors else ""))
        if not self._closed.done():
            self._closed.set_result(err)
        if not self._info_fut.done():
            self._info_fut.set_exception(err)
        for fut in self._pongs:
            if not fut.done():
                fut.set_exception(err)
        self._pongs.clear()
        for entry in list(self._resp_map.values()):
            if isinstance(entry, asyncio.Future) and not entry.done():
                entry.set_exception(err)
        self._resp_map.clear()
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf = bytearray()
        self._need = 0
        try:
            pos = self._parse(data)
        except NatsError as e:
            self.errors.append(str(e))
            if self.transport is not None:
                self.transport.close()
            return
        if pos < len(data):
            self._buf = bytearray(data[pos:] if pos else data)

    # -- parser -----------------------------------------------------------------------------

    def _parse(self, buf: bytes) -> int:
        L = len(buf)
        pos = 0
        find = buf.find
        sw = buf.startswith
        subs = self._subs
        fast_line = self._fast_line
        fast_len = self._fast_len
        fast_sub = self._fast_sub
        nmsgs = 0
        try:
            while pos < L:
                # Count-only fast path: identical control line => identical frame layout.
                if fast_sub is not None and sw(fast_line, pos):
                    if not fast_sub.active:
                        fast_line, fast_sub = b"", None
                        continue
                    if pos + fast_len > L:
                        self._need = fast_len
                        break
                    n = 1
                    pos += fast_len
                    while pos + fast_len <= L and sw(fast_line, pos):
                        n += 1
                        pos += fast_len
                    nmsgs += n
                    fast_sub._add(n)
                    continue
                end = find(CRLF, pos)
                if end < 0:
                    if L - pos > MAX_CONTROL_LINE:
                        raise NatsError("control line too long")
                    self._need = L - pos + 1
                    break
                c = buf[pos]
                if c == 77 or c == 72:  # MSG / HMSG
                    hmsg = c == 72
                    parts = buf[pos + (5 if hmsg else 4):end].split(b" ")
                    if hmsg:
                        if len(parts) == 4:
                            subj, sid, hsize, size = parts
                            reply = None
                        elif len(parts) == 5:
                            subj, sid, reply, hsize, size = parts
                        else:
                            raise NatsError(f"bad HMSG line {buf[pos:end]!r}")
                        hlen = int(hsize)
                    else:
                        if len(parts) == 3:
                            subj, sid, size = parts
                            reply = None
                        elif len(parts) == 4:
                            subj, sid, reply, size = parts
                        else:
                            raise NatsError(f"bad MSG line {buf[pos:end]!r}")
                        hlen = 0
                    start = end + 2
                    stop = start + int(size)
                    if stop + 2 > L:
                        self._need = stop + 2 - pos
                        break
                    nmsgs += 1
                    sub = subs.get(sid)
                    if sub is not None:
                        cb = sub.cb
                        if cb is None:
                            fast_line = buf[pos:start]
                            fast_len = stop + 2 - pos
                            fast_sub = sub
                            sub._add(1)
                        else:
                            sub.count += 1
                            if hmsg:
                                cb(subj, reply, buf[start:start + hlen], buf[start + hlen:stop])
                            else:
                                cb(subj, reply, None, buf[start:stop])
                    pos = stop + 2
                    continue
                if c == 80:  # PING / PONG
                    op = buf[pos:end].strip().upper()
                    if op == b"PING":
                        self._write(_PONG)
                    elif op == b"PONG":
                        if self._pongs:
                            fut = self._pongs.pop(0)
                            if not fut.done():
                                fut.set_result(None)
                    else:
                        raise NatsError(f"unknown op {buf[pos:end]!r}")
                elif c == 43:  # +OK
                    pass
                elif c == 45:  # -ERR
                    text = buf[pos + 5:end].strip().decode(errors="replace").strip("'")
                    self.errors.append(text)
                    if self.on_error is not None:
                        self.on_error(text)
                    if self._pongs and not self._connected:
                        fut = self._pongs.pop(0)
                        if not fut.done():
                            fut.set_exception(NatsError(text))
                elif c == 73:  # INFO
                    info: dict[str, Any] = json.loads(buf[pos + 5:end])
                    if not self._info_fut.done():
                        self.info = info
                        self._info_fut.set_result(info)
                    else:
                        self.info.update(info)
                else:
                    raise NatsError(f"unknown op {buf[pos:end][:40]!r}")
                pos = end + 2
        finally:
            self.msgs_in += nmsgs
            self._fast_line = fast_line
            self._fast_len = fast_len
            self._fast_sub = fast_sub
        return pos

    # -- writing ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._wbuf.append(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_writes)

    def _flush_writes(self) -> None:
        self._flush_handle = None
        if not self._wbuf:
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_raw(self, data: bytes) -> None:
        """Queue pre-built protocol bytes (e.g. ``build_pub(...) * 1000``)."""
        self._write(data)

    def publish(self, subject: str | bytes, payload: bytes = b"",
                reply: str | bytes | None = None, headers: Headers | None = None) -> None:
        if headers is not None:
            self._write(build_hpub(subject, headers, payload, reply))
        else:
            self._write(build_pub(subject, payload, reply))

    @property
    def write_paused(self) -> bool:
        return self._paused

    def buffered(self) -> int:
        """Bytes queued in the transport (not counting this loop turn's batch)."""
        return self.transport.get_write_buffer_size() if self.transport else 0

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_writes()
        if not self._paused:
            return
        if self._resume is None or self._resume.done():
            self._resume = self._loop.create_future()
        await self._resume
        if self._closed.done():
            raise self._closed.result()

    async def flush(self, timeout: float = 10.0) -> None:
        """PING and wait for the PONG: everything written before has been processed."""
        if self._closed.done():
            raise self._closed.result()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pongs.append(fut)
        self._write(_PING)
        handle = self._loop.call_later(timeout, _expire, fut)  # cheaper than wait_for
        try:
            await fut
        finally:
            handle.cancel()

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, subject: str, queue: str | None = None, cb: MsgCallback | None = None,
                  target: int | None = None) -> Subscription:
        self._next_sid += 1
        sid = b"%d" % self._next_sid
        sub = Subscription(self, sid, subject, queue, cb, target)
        self._subs[sid] = sub
        if queue:
            self._write(b"SUB %s %s %s\r\n" % (_b(subject), _b(queue), sid))
        else:
            self._write(b"SUB %s %s\r\n" % (_b(subject), sid))
        return sub

    def unsubscribe(self, sub: Subscription, max_msgs: int | None = None) -> None:
        if max_msgs:
            self._write(b"UNSUB %s %d\r\n" % (sub.sid, max_msgs))
            return
        self._write(b"UNSUB %s\r\n" % sub.sid)
        self._subs.pop(sub.sid, None)
        sub.active = False

    # -- request / reply --------------------------------------------------------------------

    def _ensure_resp(self) -> bytes:
        if self._resp_prefix is None:
            self._resp_prefix = b"_INBOX.%s." % os.urandom(11).hex().encode()
            self._resp_prefix_len = len(self._resp_prefix)
            self.subscribe(self._resp_prefix.decode() + "*", cb=self._on_response)
        return self._resp_prefix

    def _on_response(self, subject: bytes, reply: bytes | None, headers: bytes | None,
                     payload: bytes) -> None:
        token = subject[self._resp_prefix_len:]
        entry = self._resp_map.pop(token, None)
        if entry is None:
            return
        if isinstance(entry, asyncio.Future):
            if entry.done():
                return
            if headers and headers.startswith(b"NATS/1.0 503") and not payload:
                entry.set_exception(NoResponders("no responders"))
            else:
                entry.set_result(Msg(subject, reply, headers, payload))
        else:
            entry(headers, payload)

    def new_reply(self, cb: ResponseCallback | None = None) -> bytes:
        """A fresh reply subject under this client's response subscription. If ``cb`` is
        given, it is called as ``cb(headers, payload)`` with the (first) response."""
        prefix = self._ensure_resp()
        self._next_token += 1
        token = b"%d" % self._next_token
        if cb is not None:
            self._resp_map[token] = cb
        return prefix + token

    def request_cb(self, subject: str | bytes, payload: bytes,
                   cb: ResponseCallback,
                   headers: Headers | None = None) -> None:
        """Send a request without waiting; ``cb(headers, payload)`` gets the response."""
        self.publish(subject, payload, self.new_reply(cb), headers)

    async def request(self, subject: str | bytes, payload: bytes = b"", timeout: float = 5.0,
                      headers: Headers | None = None) -> Msg:
        prefix = self._ensure_resp()
        self._next_token += 1
        token = b"%d" % self._next_token
        fut: asyncio.Future[Msg] = self._loop.create_future()
        self._resp_map[token] = fut
        self.publish(subject, payload, prefix + token, headers)
        handle = self._loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._resp_map.pop(token, None)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    async def close(self) -> None:
        if self.transport is None or self._closed.done():
            return
        self._flush_writes()
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), 2.0)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("timed out"))


async def connect(host: str = "127.0.0.1", port: int = 4222, *, name: str = "rawnats",
                  headers: bool = True, echo: bool = True, no_responders: bool = True,
                  verbose: bool = False, pedantic: bool = False, user: str | None = None,
                  password: str | None = None, token: str | None = None,
                  timeout: float = 5.0, write_high: int = 4 * 1024 * 1024,
                  tls: ssl.SSLContext | None = None) -> Client:
    """Open a connection: wait for INFO, send CONNECT + PING, wait for PONG.

    ``tls`` (an ``ssl.SSLContext``) upgrades the connection after the INFO, as NATS clients
    do; a server whose INFO says ``tls_required`` gets a default context (system CAs)."""
    loop = asyncio.get_running_loop()
    auth: dict[str, str] = {}
    if token is not None:
        auth["auth_token"] = token
    if user is not None:
        auth["user"] = user
        auth["pass"] = password or ""

    def factory() -> Client:
        return Client(loop, name, headers, echo, no_responders, verbose, pedantic, auth,
                      write_high)

    _, client = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    try:
        info = await asyncio.wait_for(asyncio.shield(client._info_fut), timeout)
        if tls is None and info.get("tls_required"):
            import ssl

            tls = ssl.create_default_context()
        if tls is not None:
            # The server sent INFO in clear and waits for the handshake; the protocol object
            # stays, only its transport changes.
            client._opts["tls_required"] = True
            assert client.transport is not None  # set by connection_made
            transport = await asyncio.wait_for(
                loop.start_tls(client.transport, client, tls, server_hostname=host), timeout)
            if transport is None:  # only on a loop that is closing
                raise NatsError("TLS upgrade failed")
            transport.set_write_buffer_limits(high=write_high)
            client.transport = transport
        connect_line = b"CONNECT " + json.dumps(client._opts, separators=(",", ":")).encode()
        client._write(connect_line + CRLF)
        await client.flush(timeout)
    except BaseException:
        client.abort()
        raise
    client._connected = True
    return client
