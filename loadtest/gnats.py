"""A small blocking NATS client for gevent (locust's world).

nats-py is asyncio and does not mix with gevent's monkey-patched sockets, so the locust
users speak the protocol themselves over a gevent socket:

    nc = Client("nats://127.0.0.1:4222", name="agent-1").connect()
    sid = nc.subscribe("agents.echo", queue="echo", cb=lambda m: nc.publish(m.reply, m.data))
    msg = nc.request("agents.echo", b"hi", timeout=5)      # -> Msg; NoResponders / Timeout
    nc.publish("$mq9.AI.BROADCAST.task.available", b"{}")
    nc.flush()                                             # PING, wait for the PONG
    nc.unsubscribe(sid)                                    # or nc.drain(sid): see there
    nc.close()

CONNECT declares ``headers`` and ``no_responders``. One reader greenlet per connection
parses INFO / MSG / HMSG / PING (answered with PONG) / PONG / +OK / -ERR and runs the
subscription callbacks (they run in that greenlet: keep them short and don't block on a
reply from the same connection in them). Requests share one ``_INBOX.<random>.*``
subscription, one ``gevent.event.AsyncResult`` per request. Writes from several greenlets
are serialised by a lock. ``gevent.socket`` is used directly, so the client also works
without monkey-patching.
"""

from __future__ import annotations

import itertools
import json
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlparse

import gevent
import gevent.event
import gevent.lock
from gevent import socket

__all__ = ["Client", "ConnectionClosed", "Msg", "NatsError", "NoResponders", "Timeout"]

CRLF = b"\r\n"
MAX_CONTROL_LINE = 64 * 1024


class NatsError(Exception):
    pass


class Timeout(NatsError):
    pass


class NoResponders(NatsError):
    pass


class ConnectionClosed(NatsError):
    pass


@dataclass
class Msg:
    subject: str
    sid: int
    reply: str | None
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: str | None = None        # "503" etc. from an HMSG status line

    def json(self):
        return json.loads(self.data)


def parse_headers(block: bytes) -> tuple[str | None, dict[str, str]]:
    """``NATS/1.0[ status[ text]]\\r\\nKey: value\\r\\n...\\r\\n\\r\\n`` -> (status, headers)."""
    lines = block.decode("utf-8", "replace").split("\r\n")
    first = lines[0].split(None, 2) if lines else []
    status = first[1] if len(first) > 1 else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition(":")
        headers[key.strip()] = value.strip()
    return status, headers


def encode_headers(headers: dict[str, str]) -> bytes:
    out = [b"NATS/1.0"]
    for k, v in headers.items():
        out.append(f"{k}: {v}".encode())
    return CRLF.join(out) + CRLF + CRLF


class Client:
    def __init__(self, url: str = "nats://127.0.0.1:4222", *, name: str = "mq9-locust",
                 connect_timeout: float = 5.0, token: str | None = None,
                 user: str | None = None, password: str | None = None):
        u = urlparse(url if "://" in url else "nats://" + url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 4222
        self.name = name
        self.connect_timeout = connect_timeout
        self.token = token
        self.user = user or u.username
        self.password = password or u.password
        self.info: dict = {}
        self.sock = None
        self.errors: list[str] = []          # -ERR texts the server sent
        self._wlock = gevent.lock.RLock()
        self._reader: gevent.Greenlet | None = None
        self._closed = True
        self._close_reason: str | None = None
        self._sids = itertools.count(1)
        self._subs: dict[int, callable] = {}
        self._pongs: list[gevent.event.AsyncResult] = []
        self._inbox_prefix = ""
        self._inbox_sid = 0
        self._tokens = itertools.count(1)
        self._pending: dict[str, gevent.event.AsyncResult] = {}

    # ---- connection ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    def connect(self) -> Client:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while CRLF not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                sock.close()
                raise ConnectionClosed("server closed the connection before INFO")
            buf += chunk
        line, _, rest = buf.partition(CRLF)
        if not line.startswith(b"INFO "):
            sock.close()
            raise NatsError(f"expected INFO, got {line[:100]!r}")
        self.info = json.loads(line[5:])
        opts = {"verbose": False, "pedantic": False, "lang": "python-gevent",
                "version": "0.1", "protocol": 1, "name": self.name, "headers": True,
                "no_responders": True, "echo": True}
        if self.token:
            opts["auth_token"] = self.token
        if self.user:
            opts["user"], opts["pass"] = self.user, self.password or ""
        sock.settimeout(None)
        self.sock = sock
        self._closed = False
        self._close_reason = None
        self.errors = []
        self._subs.clear()
        self._pongs = []
        self._pending.clear()
        self._inbox_prefix = "_INBOX." + secrets.token_hex(11)
        self._inbox_sid = next(self._sids)
        self._subs[self._inbox_sid] = self._on_reply
        pong = gevent.event.AsyncResult()
        self._pongs.append(pong)
        self._send(b"CONNECT " + json.dumps(opts, separators=(",", ":")).encode() + CRLF
                   + b"PING" + CRLF
                   + f"SUB {self._inbox_prefix}.* {self._inbox_sid}".encode() + CRLF)
        self._reader = gevent.spawn(self._read_loop, rest)
        try:
            pong.get(timeout=self.connect_timeout)
        except gevent.Timeout:
            self.close()
            raise Timeout("no PONG after CONNECT") from None
        except NatsError:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.sock is None:
            return
        self._shutdown("closed by client")
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)

    def _shutdown(self, reason: str) -> None:
        if self._closed and self.sock is None:
            return
        self._closed = True
        self._close_reason = self._close_reason or reason
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        err = ConnectionClosed(self._close_reason)
        for ar in self._pongs:
            ar.set_exception(err)
        self._pongs = []
        pending, self._pending = self._pending, {}
        for ar in pending.values():
            ar.set_exception(err)

    def _send(self, data: bytes) -> None:
        sock = self.sock
        if self._closed or sock is None:
            raise ConnectionClosed(self._close_reason or "not connected")
        with self._wlock:
            try:
                sock.sendall(data)
            except OSError as e:
                self._shutdown(f"write failed: {e}")
                raise ConnectionClosed(str(e)) from e

    # ---- operations ---------------------------------------------------------------------

    def publish(self, subject: str, data: bytes = b"", reply: str | None = None,
                headers: dict[str, str] | None = None) -> None:
        r = f" {reply}" if reply else ""
        if headers:
            h = encode_headers(headers)
            self._send(f"HPUB {subject}{r} {len(h)} {len(h) + len(data)}".encode() + CRLF
                       + h + data + CRLF)
        else:
            self._send(f"PUB {subject}{r} {len(data)}".encode() + CRLF + data + CRLF)

    def subscribe(self, subject: str, cb, queue: str | None = None) -> int:
        """``cb(msg)`` runs in the reader greenlet for every message."""
        sid = next(self._sids)
        self._subs[sid] = cb
        q = f" {queue}" if queue else ""
        self._send(f"SUB {subject}{q} {sid}".encode() + CRLF)
        return sid

    def unsubscribe(self, sid: int, max_msgs: int | None = None) -> None:
        if max_msgs is None:
            self._subs.pop(sid, None)
            self._send(f"UNSUB {sid}".encode() + CRLF)
        else:
            self._send(f"UNSUB {sid} {max_msgs}".encode() + CRLF)

    def drain(self, sid: int, timeout: float = 5.0) -> None:
        """UNSUB, then PING/PONG, then forget the callback: messages the server wrote before
        it processed the UNSUB still reach ``cb`` (a plain ``unsubscribe`` drops them, as
        every NATS client does — for an mq9 owner subscription they count as delivered)."""
        self._send(f"UNSUB {sid}".encode() + CRLF)
        try:
            self.flush(timeout)
        finally:
            self._subs.pop(sid, None)

    def flush(self, timeout: float = 5.0) -> None:
        """PING and wait for the PONG: the server has processed everything sent before,
        and everything it wrote before the PONG has been read and dispatched."""
        ar = gevent.event.AsyncResult()
        self._pongs.append(ar)
        try:
            self._send(b"PING" + CRLF)
            ar.get(timeout=timeout)
        except gevent.Timeout:
            raise Timeout(f"no PONG within {timeout}s") from None
        finally:
            if ar in self._pongs and not ar.ready():
                self._pongs.remove(ar)

    def request(self, subject: str, data: bytes = b"", timeout: float = 5.0,
                headers: dict[str, str] | None = None) -> Msg:
        token = str(next(self._tokens))
        ar = gevent.event.AsyncResult()
        self._pending[token] = ar
        try:
            self.publish(subject, data, reply=f"{self._inbox_prefix}.{token}", headers=headers)
            msg = ar.get(timeout=timeout)
        except gevent.Timeout:
            raise Timeout(f"no reply on {subject} within {timeout}s") from None
        finally:
            self._pending.pop(token, None)
        if msg.status == "503":
            raise NoResponders(f"no responders on {subject}")
        return msg

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        ar = self._pending.pop(token, None)
        if ar is not None:
            ar.set(msg)

    # ---- reader -------------------------------------------------------------------------

    def _read_loop(self, buf: bytes) -> None:
        sock = self.sock
        reason = "connection closed by server"
        try:
            while True:
                buf = self._process(buf)
                if self._closed:
                    return
                try:
                    chunk = sock.recv(256 * 1024)
                except OSError as e:
                    reason = f"read failed: {e}"
                    break
                if not chunk:
                    break
                buf += chunk
        except gevent.GreenletExit:
            return
        except Exception as e:  # noqa: BLE001 - a parse error: the stream can't be trusted
            reason = f"protocol error: {type(e).__name__}: {e}"
        if self.errors and reason == "connection closed by server":
            reason += f" after -ERR {self.errors[-1]}"
        self._shutdown(reason)

    def _process(self, buf: bytes) -> bytes:
        """Handles every complete frame in ``buf``; returns what is left."""
        pos = 0
        n = len(buf)
        while pos < n:
            end = buf.find(CRLF, pos)
            if end < 0:
                if n - pos > MAX_CONTROL_LINE:
                    raise NatsError("control line too long")
                break
            line = buf[pos:end]
            op = line[:4].upper()
            if op == b"MSG ":
                parts = line.split()
                size = int(parts[-1])
                start = end + 2
                if n < start + size + 2:
                    break
                data = buf[start:start + size]
                reply = parts[3].decode() if len(parts) == 5 else None
                self._dispatch(Msg(parts[1].decode(), int(parts[2]), reply, data))
                pos = start + size + 2
            elif op == b"HMSG":
                parts = line.split()
                hsize, total = int(parts[-2]), int(parts[-1])
                start = end + 2
                if n < start + total + 2:
                    break
                status, headers = parse_headers(buf[start:start + hsize])
                reply = parts[3].decode() if len(parts) == 6 else None
                self._dispatch(Msg(parts[1].decode(), int(parts[2]), reply,
                                   buf[start + hsize:start + total], headers, status))
                pos = start + total + 2
            else:
                pos = end + 2
                if op == b"PING":
                    self._send(b"PONG" + CRLF)
                elif op == b"PONG":
                    if self._pongs:
                        self._pongs.pop(0).set(True)
                elif op == b"-ERR":
                    self.errors.append(line[5:].decode("utf-8", "replace").strip())
                elif op == b"INFO":
                    try:
                        self.info = json.loads(line[5:])
                    except ValueError:
                        pass
                # +OK: nothing to do
        return buf[pos:]

    def _dispatch(self, msg: Msg) -> None:
        cb = self._subs.get(msg.sid)
        if cb is None:
            return
        try:
            cb(msg)
        except ConnectionClosed:
            pass
        except Exception:  # a callback's bug must not kill the connection
            import logging

            logging.getLogger("gnats").exception("callback for %s failed", msg.subject)
