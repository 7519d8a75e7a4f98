"""A tiny raw-socket NATS client and a nats-server launcher, for protocol tests.

``RawConn`` speaks bytes, nothing more: it connects, reads the INFO line, sends whatever it
is given and reads back until a pattern appears, until the server has been quiet for a
while, or until the server closes the connection. It remembers whether the server closed.

``NatsServer`` runs the real Go nats-server (``.venv/bin/nats-server``) on a free port of
127.0.0.1 with limits written to a small config file (not every limit has a flag in every
version).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
CRLF = b"\r\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts on ``port`` and sends its first bytes (the INFO line)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.settimeout(2.0)
                if s.recv(1):  # a listener that accepts but never speaks is not ready
                    return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"nothing accepting on {HOST}:{port} after {timeout}s ({last})")


def connect_line(**opts) -> bytes:
    """A CONNECT line; defaults are what a plain client sends."""
    body = {"verbose": False, "pedantic": False, "protocol": 1, "lang": "raw", "version": "0"}
    body.update(opts)
    return b"CONNECT " + json.dumps(body, separators=(",", ":")).encode() + CRLF


class RawConn:
    """One TCP connection to a NATS server, driven byte by byte."""

    def __init__(self, port: int, host: str = HOST, read_info: bool = True, timeout: float = 3.0,
                 rcvbuf: int | None = None):
        if rcvbuf:  # a small receive window, set before connecting, makes a slow reader slow
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""        # received, not yet taken by a read_* call
        self.closed = False    # the server closed (EOF or reset)
        self.info_line: bytes | None = None
        self.info: dict | None = None
        if read_info:
            self.read_info(timeout)

    # ---- receiving ---------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for bytes; True if any arrived. Sets ``closed`` on EOF."""
        if self.closed:
            return False
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not r:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return False
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _take(self, n: int | None = None) -> bytes:
        n = len(self.buf) if n is None else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_info(self, timeout: float = 3.0) -> dict:
        line = self.read_until(CRLF, timeout)
        # nats-server writes ``INFO {...} \r\n`` (a space before CRLF); allow either.
        if not (line.startswith(b"INFO {") and line.rstrip(b" \r\n").endswith(b"}")
                and line.endswith(CRLF)):
            raise AssertionError(f"expected an INFO line, got {line!r}")
        self.info_line = line
        self.info = json.loads(line[5:])
        return self.info

    def read_until(self, pattern: bytes | re.Pattern, timeout: float = 2.0) -> bytes:
        """Everything up to and including the first match of ``pattern``; if the server
        closes or ``timeout`` passes first, everything received so far."""
        deadline = time.monotonic() + timeout
        while True:
            if isinstance(pattern, bytes):
                i = self.buf.find(pattern)
                if i >= 0:
                    return self._take(i + len(pattern))
            else:
                m = pattern.search(self.buf)
                if m:
                    return self._take(m.end())
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return self._take()
            self._fill(left)

    def read_quiet(self, quiet_ms: int = 100, timeout: float = 3.0) -> bytes:
        """Everything received until nothing has arrived for ``quiet_ms`` (or the server
        closed, or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            if not self._fill(min(quiet_ms / 1000, deadline - time.monotonic())):
                break
        return self._take()

    def read_until_closed(self, timeout: float = 3.0) -> bytes:
        """Everything received until the server closes (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._fill(left)
        return self._take()

    def check_closed(self, wait_ms: int = 50) -> bool:
        """Drain for ``wait_ms`` and report whether the server has closed. Bytes that arrive
        meanwhile stay in the buffer."""
        self._fill(wait_ms / 1000)
        while not self.closed and self._fill(0):
            pass
        return self.closed

    # ---- sending -----------------------------------------------------------------------

    def send(self, data: bytes, timeout: float = 3.0) -> bool:
        """Send all of ``data``; False if the server has closed the connection."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > deadline:
                    raise TimeoutError("server not reading") from None
                select.select([], [self.sock], [], 0.05)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.closed = True
                return False
        return True

    def connect(self, **opts) -> None:
        self.send(connect_line(**opts))

    def handshake(self, timeout: float = 3.0, **opts) -> bytes:
        """CONNECT + PING + PING, and read through the second PONG, so the connection is set
        up and the INFO nats-server sends after the first PONG is consumed. Options that
        are None are left out of the CONNECT. Returns what was read."""
        opts = {k: v for k, v in opts.items() if v is not None}
        self.send(connect_line(**opts) + b"PING\r\nPING\r\n")
        got = b""
        for _ in range(2):
            got += self.read_until(b"PONG\r\n", timeout)
            if not got.endswith(b"PONG\r\n"):
                raise AssertionError(f"handshake failed: {got!r} closed={self.closed}")
        return got

    def exchange(self, data: bytes, until: bytes = b"PONG\r\n", timeout: float = 3.0) -> bytes:
        """Send ``data`` followed by a PING and return everything up to the PONG (or
        whatever arrived before the server closed)."""
        self.send(data + b"PING\r\n")
        return self.read_until(until, timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def info_fields(info: dict, auth: bool = False) -> dict:
    """The INFO fields two servers must agree on."""
    out = {"max_payload": info.get("max_payload"), "headers": info.get("headers"),
           "proto": info.get("proto")}
    if auth:
        out["auth_required"] = info.get("auth_required")
    return out


def split_frames(data: bytes) -> list[bytes]:
    """Cut a server byte stream into protocol messages (MSG/HMSG with their payload)."""
    frames = []
    i = 0
    while i < len(data):
        j = data.find(CRLF, i)
        if j < 0:
            frames.append(data[i:])
            break
        line = data[i:j + 2]
        parts = line.split()
        size = 0
        if parts and parts[0] in (b"MSG", b"HMSG"):
            try:
                size = int(parts[-1]) + 2
            except ValueError:
                size = 0
        frames.append(data[i:j + 2 + size])
        i = j + 2 + size
    return frames


# ---- nats-server ---------------------------------------------------------------------

NATS_SERVER = os.path.join(os.path.dirname(sys.executable), "nats-server")
if not os.path.exists(NATS_SERVER):
    NATS_SERVER = shutil.which("nats-server") or NATS_SERVER


def die_with_parent() -> None:
    """``preexec_fn`` for servers started by tests: SIGTERM them if the test process dies
    (Linux PR_SET_PDEATHSIG), so a killed test run leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except Exception:  # noqa: BLE001 - best effort, not on Linux
        pass


def _conf_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))


@dataclass
class NatsServer:
    """The real nats-server on a free port. Options (all optional):

    max_payload, max_control_line, max_connections, max_pending (bytes);
    auth_token, user + password, auth_timeout (seconds);
    ping_interval (seconds), max_pings_out; write_deadline (seconds);
    extra: raw config text appended as is.
    """

    opts: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    workdir: str | None = None

    def config_text(self) -> str:
        o = dict(self.opts)
        lines = [f"listen: {HOST}:{self.port}"]
        for key in ("max_payload", "max_control_line", "max_connections", "max_pending"):
            if o.get(key) is not None:
                lines.append(f"{key}: {int(o[key])}")
        if o.get("ping_interval") is not None:
            lines.append(f'ping_interval: "{_duration(o["ping_interval"])}"')
        if o.get("max_pings_out") is not None:
            lines.append(f"ping_max: {int(o['max_pings_out'])}")
        if o.get("write_deadline") is not None:
            lines.append(f'write_deadline: "{_duration(o["write_deadline"])}"')
        auth = []
        if o.get("auth_token") is not None:
            auth.append(f"token: {_conf_value(o['auth_token'])}")
        if o.get("user") is not None:
            auth.append(f"user: {_conf_value(o['user'])}")
            auth.append(f"password: {_conf_value(o['password'])}")
        if auth and o.get("auth_timeout") is not None:
            auth.append(f"timeout: {float(o['auth_timeout'])}")
        if auth:
            lines.append("authorization {\n  " + "\n  ".join(auth) + "\n}")
        if o.get("extra"):
            lines.append(o["extra"])
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.port = self.port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="natsraw-")
        conf = os.path.join(self.workdir, "server.conf")
        with open(conf, "w") as fh:
            fh.write(self.config_text())
        self._log = open(os.path.join(self.workdir, "server.log"), "wb")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", conf, "-a", HOST, "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        try:
            wait_for_port(self.port, timeout, self.proc)
        except Exception as e:
            self._log.flush()
            with open(os.path.join(self.workdir, "server.log"), "rb") as fh:
                log = fh.read()[-2000:].decode(errors="replace")
            conf_text = self.config_text()
            self.stop()
            raise RuntimeError(f"nats-server did not start: {e}\nconfig:\n{conf_text}log:\n{log}") from e
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _duration(seconds: float) -> str:
    ms = int(round(float(seconds) * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def start_nats_server(**opts) -> NatsServer:
    return NatsServer(opts=opts).start()
