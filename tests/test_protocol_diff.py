"""Differential tests of the core NATS client protocol: nats-server against mq9.

Every case is a raw byte exchange over TCP (``natsraw.RawConn``), on one connection or a
few. Each test runs once per server kind (the ``target`` fixture is parametrised over
``nats-server`` and ``mq9``; pytest runs all nats-server tests first):

- against nats-server the outcome must equal the expected bytes written here (they were
  learned from nats-server v2.15.1 and document what mq9 has to produce);
- against mq9 the outcome must equal what the real nats-server returns for the same bytes,
  run live (a reference cache filled by the nats-server pass), so the test stays
  differential even if a newer nats-server changes a detail.

An outcome is ``(bytes the server sent, whether it closed the connection, INFO fields)``.
INFO lines are normalised: in the bytes each becomes ``INFO {..}\\r\\n`` and only
``max_payload``, ``headers``, ``proto`` and ``auth_required`` are compared.

Most exchanges end with two PINGs and read up to the second PONG: since v2.12 nats-server
answers the first PING after a CONNECT (with ``protocol`` >= 1) with ``PONG`` followed by an
INFO line (a copy of its INFO plus ``"connect_info": true``), so the second PONG marks a
point after which nothing more is expected. mq9 must send that INFO too (it is compared).

Timing-based cases use small settings (ping_interval 1 s, auth_timeout 0.5 s); the slow
consumer case compares the outcome (cut off, others unaffected), not bytes.

Deliberate differences between mq9 and nats-server: none. (If one is ever added, mark it
here and at the case with ``# MQ9 DIFFERS: <why>``.)
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import natsraw  # noqa: E402
from natsraw import CRLF, RawConn, connect_line, free_port, info_fields, split_frames  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

# ---- server settings -----------------------------------------------------------------------

# One name per set of settings; both servers get the same values. Tests are ordered by the
# setting they use so that one server per setting is started per kind.
CONFIGS: dict[str, dict] = {
    "base": dict(max_payload=1024, max_control_line=512),
    "token": dict(auth_token="s3cr3t", auth_timeout=0.5),
    "userpass": dict(user="alice", password="pw", auth_timeout=0.5),
    "maxconn": dict(max_connections=2),
    "ping": dict(ping_interval=1, max_pings_out=2),
    # nats-server refuses max_payload > max_pending, so lower both.
    "slow": dict(max_pending=256 * 1024, max_payload=64 * 1024),
}

MQ9_FLAGS = {
    "max_payload": "--max-payload",
    "max_control_line": "--max-control-line",
    "max_connections": "--max-connections",
    "max_pending": "--max-pending",
    "auth_token": "--auth-token",
    "user": "--user",
    "password": "--pass",
    "auth_timeout": "--auth-timeout",
    "ping_interval": "--ping-interval",
    "max_pings_out": "--max-pings-out",
}


class Mq9Node:
    """``python -m mq9 node`` on a free port, 2 gateways, 1 shard, data in a temp dir.
    ``launch()`` only spawns it, ``ready()`` waits for it, so the next node can start while
    the tests of the current one run (a node takes a few seconds to come up)."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mq9-diff-")
        self.proc: subprocess.Popen | None = None
        self.is_ready = False

    def launch(self) -> Mq9Node:
        self.cmd = [PYTHON, "-m", "mq9", "node", "--host", natsraw.HOST, "--port", str(self.port),
                    "--metrics-port", "0", "--cluster-port", str(free_port()),
                    "--data-dir", os.path.join(self.dir, "data"), "--gateways", "2", "--shards", "1"]
        for key, value in self.opts.items():
            self.cmd += [MQ9_FLAGS[key], str(value)]
        self._log = open(os.path.join(self.dir, "node.log"), "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=natsraw.die_with_parent)
        self.started = time.monotonic()
        return self

    def ready(self, timeout: float = 30.0) -> Mq9Node:
        if self.is_ready:
            return self
        deadline = self.started + timeout
        try:
            natsraw.wait_for_port(self.port, max(1.0, deadline - time.monotonic()), self.proc)
            # Both gateways share the port; make sure a few connections in a row complete
            # a handshake, whichever gateway the kernel hands them to.
            ok = 0
            while ok < 6:
                if time.monotonic() > deadline:
                    raise TimeoutError("mq9 gateways not answering PING")
                try:
                    with RawConn(self.port) as c:
                        c.handshake(auth_token=self.opts.get("auth_token"),
                                    user=self.opts.get("user"),
                                    **{"pass": self.opts.get("password")})
                    ok += 1
                except (OSError, AssertionError):
                    ok = 0
                    time.sleep(0.1)
        except Exception as e:
            self._log.flush()
            with open(os.path.join(self.dir, "node.log"), "rb") as fh:
                log = fh.read()[-3000:].decode(errors="replace")
            self.stop()
            raise RuntimeError(f"mq9 did not start: {e}\ncommand: {' '.join(self.cmd)}\nlog:\n{log}") from e
        self.is_ready = True
        return self

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; ``stop()`` later reaps it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc is not None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own child's session only
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Pool:
    """Servers by (kind, config), started on first use. nats-servers are cheap and stay up.
    At most one mq9 node serves tests at a time; when a config is first used, the node for
    the next config (tests run in config order) is launched in the background."""

    def __init__(self):
        self.live: dict[tuple[str, str], object] = {}
        self.next_mq9: dict[str, Mq9Node] = {}
        self.dying: list[Mq9Node] = []

    def get(self, kind: str, config: str):
        key = (kind, config)
        if key in self.live:
            return self.live[key]
        if kind == "nats-server":
            self.live[key] = natsraw.start_nats_server(**CONFIGS[config])
            return self.live[key]
        node = self.next_mq9.pop(config, None) or Mq9Node(CONFIGS[config]).launch()
        for other in [k for k in self.live if k[0] == "mq9"]:
            old = self.live.pop(other)
            old.terminate()
            self.dying.append(old)
        order = list(CONFIGS)
        following = order[order.index(config) + 1:]
        if following and following[0] not in self.next_mq9:
            self.next_mq9[following[0]] = Mq9Node(CONFIGS[following[0]]).launch()
        self.live[key] = node.ready()
        return node

    def stop_all(self) -> None:
        for server in list(self.live.values()) + list(self.next_mq9.values()) + self.dying:
            server.stop()
        self.live.clear()
        self.next_mq9.clear()
        self.dying.clear()


@pytest.fixture(scope="module")
def pool():
    p = Pool()
    yield p
    p.stop_all()


def _mq9_importable() -> str | None:
    try:
        importlib.import_module("mq9.gateway.server")
    except Exception as e:  # noqa: BLE001 - anything that stops the import counts
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class Target:
    kind: str
    pool: Pool

    def port(self, config: str) -> int:
        return self.pool.get(self.kind, config).port


@pytest.fixture(scope="module", params=["nats-server", "mq9"])
def target(request, pool):
    return Target(request.param, pool)


# ---- outcomes --------------------------------------------------------------------------------

I = b"INFO {..}\r\n"  # noqa: E741 - an INFO line, after normalisation (reads like the protocol)
END = b"PONG\r\n" + I + b"PONG\r\n"  # answer to the two PINGs after a CONNECT (protocol 1)
END0 = b"PONG\r\nPONG\r\n"  # the same without a CONNECT (no connect INFO)


@dataclass(frozen=True)
class Outcome:
    data: bytes          # what the server sent after its first INFO, INFO lines normalised
    closed: bool         # the server closed the connection
    infos: tuple = ()    # the compared fields of every INFO line, in order

    def __repr__(self):
        return f"Outcome(data={self.data!r}, closed={self.closed}, infos={self.infos!r})"


def _info_key(info: dict) -> tuple:
    fields = info_fields(info)
    fields["auth_required"] = bool(info.get("auth_required"))
    return tuple(sorted(fields.items()))


def normalise(data: bytes, infos: list) -> bytes:
    out = []
    for frame in split_frames(data):
        if frame.startswith(b"INFO ") and frame.endswith(CRLF):
            infos.append(_info_key(json.loads(frame[5:])))
            out.append(I)
        else:
            out.append(frame)
    return b"".join(out)


def exchange(port: int, data: bytes = b"", connect: dict | None = None, pings: int = 2,
             timeout: float = 3.0, close_wait: float = 2.0) -> Outcome:
    """Open a connection, send CONNECT (if ``connect`` is not None) + ``data`` + ``pings``
    PINGs in one write, read up to the last PONG (or until the server closes). With
    ``pings=0`` read until the server closes or ``close_wait`` passes."""
    with RawConn(port) as c:
        infos = [_info_key(c.info)]
        c.send((connect_line(**connect) if connect is not None else b"") + data + b"PING\r\n" * pings)
        out = b""
        if pings:
            for _ in range(pings):
                out += c.read_until(b"PONG\r\n", timeout)
                if c.closed:
                    break
            c.check_closed(30)
            out += c._take()
        else:
            out = c.read_until_closed(close_wait)
        return Outcome(normalise(out, infos), c.closed, tuple(infos))


REFERENCE: dict[str, object] = {}


def diff(target: Target, config: str, key: str, run, expect=None):
    """Run ``run(port)`` against ``target``. On nats-server, check it against ``expect``
    (when given) and remember it; on mq9, compare it with nats-server's live outcome."""
    got = run(target.port(config))
    if target.kind == "nats-server":
        REFERENCE[key] = got
        if expect is not None:
            assert got == expect, f"nats-server changed behaviour for {key}: {got!r}"
    else:
        ref = REFERENCE.get(key)
        if ref is None:
            ref = REFERENCE[key] = run(target.pool.get("nats-server", config).port)
        assert got == ref, f"mq9 differs from nats-server in {key}:\n  mq9:         {got!r}\n  nats-server: {ref!r}"
    return got


# ---- single-connection exchanges ----------------------------------------------------------------

C = dict(verbose=False, pedantic=False, protocol=1, headers=True)  # a plain client's CONNECT
V = dict(C, verbose=True)
P = dict(C, pedantic=True)
NR = dict(C, no_responders=True)
H = b"NATS/1.0\r\nA: b\r\n\r\n"  # an 18-byte header block
LONG = 512  # CONFIGS["base"]["max_control_line"]


def _hpub(subject: bytes, payload: bytes, reply: bytes = b"", hdr: bytes = H) -> bytes:
    r = reply + b" " if reply else b""
    return b"HPUB %s %s%d %d\r\n%s%s\r\n" % (subject, r, len(hdr), len(hdr) + len(payload), hdr, payload)


# (id, config, CONNECT options or None for no CONNECT, bytes sent, expected bytes, closed, pings)
ERR_UNKNOWN = b"-ERR 'Unknown Protocol Operation'\r\n"
CASES = [
    # -- the basics
    ("connect_ping_pong", "base", C, b"", END, False, 2),
    ("verbose_ok_after_each_op", "base", V,
     b"SUB v 1\r\nPUB v 2\r\nhi\r\nUNSUB 1\r\nPUB v 2\r\nhi\r\n",
     # +OK for CONNECT, SUB, PUB (before the MSG it causes), UNSUB, PUB; none for PING.
     b"+OK\r\n+OK\r\n+OK\r\nMSG v 1 2\r\nhi\r\n+OK\r\n+OK\r\n" + END, False, 2),
    ("pub_sub_msg_reply", "base", C,
     b"SUB ps 1\r\nPUB ps 2\r\nhi\r\nPUB ps rep.ly 5\r\nhello\r\nPUB ps 0\r\n\r\nPUB ps 4\r\na\r\nb\r\n",
     b"MSG ps 1 2\r\nhi\r\nMSG ps 1 rep.ly 5\r\nhello\r\nMSG ps 1 0\r\n\r\nMSG ps 1 4\r\na\r\nb\r\n" + END,
     False, 2),
    ("hpub_hmsg", "base", C,
     b"SUB hp 1\r\n" + _hpub(b"hp", b"hi") + _hpub(b"hp", b"yo", reply=b"r.1") + _hpub(b"hp", b"", hdr=H),
     b"HMSG hp 1 18 20\r\n" + H + b"hi\r\nHMSG hp 1 r.1 18 20\r\n" + H + b"yo\r\n"
     b"HMSG hp 1 18 18\r\n" + H + b"\r\n" + END,
     False, 2),
    ("hpub_zero_header_len_is_msg", "base", C, b"SUB hz 1\r\nHPUB hz 0 2\r\nhi\r\n",
     b"MSG hz 1 2\r\nhi\r\n" + END, False, 2),
    ("hpub_without_headers_in_connect", "base", dict(C, headers=False),
     b"HPUB hn 18 20\r\n" + H + b"hi\r\n", b"", True, 2),  # silent close
    ("hpub_header_larger_than_total", "base", C, b"HPUB hl 12 10\r\n", b"", True, 2),  # silent close
    ("sub_queue_single_member", "base", C, b"SUB sq grp 1\r\nPUB sq 1\r\nx\r\n",
     b"MSG sq 1 1\r\nx\r\n" + END, False, 2),
    ("sub_duplicate_sid_ignored", "base", C,
     b"SUB dup1 1\r\nSUB dup2 1\r\nPUB dup1 1\r\na\r\nPUB dup2 1\r\nb\r\n", b"MSG dup1 1 1\r\na\r\n" + END, False, 2),
    ("sub_non_numeric_sid", "base", C, b"SUB sn abc\r\nPUB sn 1\r\nx\r\n", b"MSG sn abc 1\r\nx\r\n" + END, False, 2),
    ("unsub_max_msgs", "base", C,
     b"SUB um 1\r\nUNSUB 1 2\r\nPUB um 1\r\na\r\nPUB um 1\r\nb\r\nPUB um 1\r\nc\r\n",
     b"MSG um 1 1\r\na\r\nMSG um 1 1\r\nb\r\n" + END, False, 2),
    ("unsub_max_already_reached", "base", C,
     b"SUB ur 1\r\nPUB ur 1\r\na\r\nPUB ur 1\r\nb\r\nUNSUB 1 2\r\nPUB ur 1\r\nc\r\n",
     b"MSG ur 1 1\r\na\r\nMSG ur 1 1\r\nb\r\n" + END, False, 2),
    ("unsub_max_zero_is_now", "base", C, b"SUB u0 1\r\nUNSUB 1 0\r\nPUB u0 1\r\nx\r\n", END, False, 2),
    ("unsub_bad_max_is_now", "base", C, b"SUB ub 1\r\nUNSUB 1 abc\r\nPUB ub 1\r\nx\r\n", END, False, 2),
    ("unsub_unknown_sid", "base", C, b"UNSUB 99\r\n", END, False, 2),
    ("unsub_no_args", "base", C, b"UNSUB\r\n", ERR_UNKNOWN, True, 2),
    ("unsub_too_many_args", "base", C, b"UNSUB 1 2 3\r\n", b"", True, 2),  # silent close
    ("echo_false_own_msgs_dropped", "base", dict(C, echo=False), b"SUB ef 1\r\nPUB ef 1\r\nx\r\n", END, False, 2),
    # -- parser
    ("unknown_op", "base", C, b"FOO bar\r\n", ERR_UNKNOWN, True, 2),
    ("msg_from_client", "base", C, b"MSG x 1 2\r\nhi\r\n", ERR_UNKNOWN, True, 2),
    ("ok_from_client_ignored", "base", C, b"+OK\r\n", END, False, 2),
    ("err_from_client", "base", C, b"-ERR 'x'\r\n", b"", True, 2),  # silent close
    ("info_from_client_ignored", "base", C, b"INFO {}\r\n", END, False, 2),
    ("pong_from_client_ignored", "base", C, b"PONG\r\n", END, False, 2),
    ("lowercase_ops", "base", None,
     connect_line(**C).replace(b"CONNECT", b"connect") + b"sub lc 1\r\npub lc 2\r\nhi\r\nhpub lc 18 18\r\n" + H
     + b"\r\nunsub 1\r\npub lc 1\r\nx\r\nping\r\n",
     b"MSG lc 1 2\r\nhi\r\nHMSG lc 1 18 18\r\n" + H + b"\r\nPONG\r\n" + I + END0, False, 2),
    ("mixed_case_ops", "base", C, b"Sub mc 1\r\npUb mc 1\r\nx\r\nPiNg\r\n",
     b"MSG mc 1 1\r\nx\r\nPONG\r\n" + I + END0, False, 2),
    ("tabs_and_spaces", "base", C, b"SUB\ttb  1\r\nPUB \t tb\t\t1\r\nx\r\n", b"MSG tb 1 1\r\nx\r\n" + END, False, 2),
    ("bare_lf_line_end", "base", C, b"SUB lf 1\nPUB lf 1\nx\r\n", b"MSG lf 1 1\r\nx\r\n" + END, False, 2),
    ("payload_without_crlf", "base", C, b"PUB pc 2\r\nhiXX", ERR_UNKNOWN, True, 0),
    # -- before / in CONNECT
    ("pub_without_connect", "base", None, b"SUB nc 1\r\nPUB nc 2\r\nhi\r\n",
     # no CONNECT: nats-server's defaults are verbose=true, pedantic=true; no connect INFO
     b"+OK\r\n+OK\r\nMSG nc 1 2\r\nhi\r\n" + END0, False, 2),
    ("pub_wildcard_without_connect", "base", None, b"PUB nw.* 2\r\nhi\r\n",
     b"-ERR 'Invalid Publish Subject'\r\n+OK\r\n" + END0, False, 2),
    ("ping_without_connect", "base", None, b"", END0, False, 2),
    ("connect_bad_json", "base", None, b"CONNECT {bad\r\n", b"", True, 2),  # silent close
    ("connect_not_object", "base", None, b"CONNECT 5\r\n", b"", True, 2),  # silent close
    ("connect_protocol_2", "base", dict(C, protocol=2), b"",
     b"-ERR 'invalid client protocol'\r\n", True, 2),
    ("connect_protocol_0", "base", dict(C, protocol=0), b"", END0, False, 2),  # no connect INFO
    ("connect_unknown_field", "base", dict(C, foo=1), b"", END, False, 2),
    ("connect_twice", "base", C, connect_line(**C), END, False, 2),
    ("connect_too_long", "base", dict(C, name="n" * LONG), b"",
     b"-ERR 'maximum control line exceeded'\r\n", True, 2),
    # -- bad arguments
    ("pub_no_size", "base", C, b"PUB foo\r\n", b"", True, 2),  # silent close
    ("pub_too_many_args", "base", C, b"PUB a b c d\r\n", b"", True, 2),  # silent close
    ("pub_no_args", "base", C, b"PUB\r\n", ERR_UNKNOWN, True, 2),  # no space after the op: parse error
    ("pub_size_not_numeric", "base", C, b"PUB foo abc\r\n", b"", True, 2),  # silent close
    ("pub_size_negative", "base", C, b"PUB foo -1\r\n", b"", True, 2),  # silent close
    ("hpub_size_not_numeric", "base", C, b"HPUB foo x 10\r\n", b"", True, 2),  # silent close
    ("sub_no_sid", "base", C, b"SUB foo\r\n", b"", True, 2),  # silent close
    ("sub_too_many_args", "base", C, b"SUB foo q 1 2\r\n", b"", True, 2),  # silent close
    # -- limits
    ("payload_at_max", "base", C, b"SUB pm 1\r\nPUB pm 1024\r\n" + b"x" * 1024 + b"\r\n",
     b"MSG pm 1 1024\r\n" + b"x" * 1024 + b"\r\n" + END, False, 2),
    ("payload_too_large", "base", C, b"PUB pl 1025\r\n",
     b"-ERR 'Maximum Payload Violation'\r\n", True, 2),
    ("hpub_payload_too_large", "base", C, b"HPUB pl 18 1025\r\n",
     b"-ERR 'Maximum Payload Violation'\r\n", True, 2),
    # The limit applies to the arguments after the op (without CRLF): len(args) > max.
    ("control_line_at_max", "base", C, b"SUB " + b"a" * (LONG - 2) + b" 1\r\n", END, False, 2),
    ("control_line_exceeded", "base", C, b"SUB " + b"a" * (LONG - 1) + b" 1\r\n",
     b"-ERR 'maximum control line exceeded'\r\n", True, 2),
    ("control_line_exceeded_no_crlf", "base", C, b"PUB " + b"a" * (LONG + 100),
     b"-ERR 'maximum control line exceeded'\r\n", True, 0),
    # -- subjects
    ("sub_invalid_empty_token", "base", C, b"SUB foo..bar 1\r\n", b"-ERR 'Invalid Subject'\r\n" + END, False, 2),
    ("sub_invalid_fwc_not_last", "base", C, b"SUB foo.>.bar 1\r\n", b"-ERR 'Invalid Subject'\r\n" + END, False, 2),
    ("sub_invalid_leading_dot", "base", C, b"SUB .foo 1\r\n", b"-ERR 'Invalid Subject'\r\n" + END, False, 2),
    ("sub_invalid_trailing_dot", "base", C, b"SUB foo. 1\r\n", b"-ERR 'Invalid Subject'\r\n" + END, False, 2),
    ("sub_blank_subject", "base", C, b"SUB   1\r\n", b"", True, 2),  # one arg only: silent close
    ("sub_invalid_verbose", "base", V, b"SUB foo..bar 1\r\n",
     b"+OK\r\n-ERR 'Invalid Subject'\r\n" + END, False, 2),  # no +OK for the failed SUB
    ("sub_partial_wildcards_are_literal", "base", C,
     b"SUB pw.*x 1\r\nSUB pw.b> 2\r\nPUB pw.*x 1\r\na\r\nPUB pw.ax 1\r\nb\r\nPUB pw.b> 1\r\nc\r\n",
     b"MSG pw.*x 1 1\r\na\r\nMSG pw.b> 2 1\r\nc\r\n" + END, False, 2),
    ("sub_queue_name_not_validated", "base", C, b"SUB qv q..x 1\r\nPUB qv 1\r\nx\r\n",
     b"MSG qv 1 1\r\nx\r\n" + END, False, 2),
    ("pub_invalid_subject_not_pedantic", "base", C, b"SUB > 1\r\nPUB foo..bar 1\r\nx\r\nPUB pi.* 1\r\ny\r\n",
     # not checked without pedantic; the wildcard subject is delivered as a literal
     b"MSG pi.* 1 1\r\ny\r\n" + END, False, 2),
    ("pedantic_pub_wildcard", "base", P, b"SUB pp.* 1\r\nPUB pp.* 1\r\nx\r\n",
     # -ERR, but the message is still delivered
     b"-ERR 'Invalid Publish Subject'\r\nMSG pp.* 1 1\r\nx\r\n" + END, False, 2),
    ("pedantic_pub_invalid", "base", P, b"PUB pv..x 1\r\nx\r\n", b"-ERR 'Invalid Publish Subject'\r\n" + END, False, 2),
    ("pedantic_verbose_pub_wildcard", "base", dict(P, verbose=True), b"PUB pp.> 1\r\nx\r\n",
     b"+OK\r\n-ERR 'Invalid Publish Subject'\r\n+OK\r\n" + END, False, 2),
    ("pedantic_reply_not_checked", "base", P, b"SUB pr 1\r\nPUB pr r.* 1\r\nx\r\n",
     b"MSG pr 1 r.* 1\r\nx\r\n" + END, False, 2),
    # -- no responders
    ("no_responders_503", "base", NR, b"SUB _INBOX.nr1 1\r\nPUB nr1 _INBOX.nr1 2\r\nhi\r\n",
     b"HMSG _INBOX.nr1 1 35 35\r\nNATS/1.0 503\r\nNats-Subject: nr1\r\n\r\n\r\n" + END, False, 2),
    ("no_responders_503_hpub", "base", NR, b"SUB _INBOX.nr2 7\r\n" + _hpub(b"nr2x", b"hi", reply=b"_INBOX.nr2"),
     b"HMSG _INBOX.nr2 7 36 36\r\nNATS/1.0 503\r\nNats-Subject: nr2x\r\n\r\n\r\n" + END, False, 2),
    ("no_responders_wildcard_reply_sub", "base", NR, b"SUB _INBOX.* 3\r\nPUB nr3 _INBOX.nr3 0\r\n\r\n",
     b"HMSG _INBOX.nr3 3 35 35\r\nNATS/1.0 503\r\nNats-Subject: nr3\r\n\r\n\r\n" + END, False, 2),
    ("no_responders_no_reply_sub", "base", NR, b"PUB nr4 _INBOX.nr4 2\r\nhi\r\n", END, False, 2),
    ("no_responders_only_queue_reply_sub", "base", NR, b"SUB _INBOX.nr5 q 1\r\nPUB nr5 _INBOX.nr5 2\r\nhi\r\n",
     END, False, 2),
    ("no_responders_not_requested", "base", C, b"SUB _INBOX.nr6 1\r\nPUB nr6 _INBOX.nr6 2\r\nhi\r\n", END, False, 2),
    ("no_responders_with_responder", "base", NR, b"SUB _INBOX.nr7 1\r\nSUB nr7 2\r\nPUB nr7 _INBOX.nr7 2\r\nhi\r\n",
     b"MSG nr7 2 _INBOX.nr7 2\r\nhi\r\n" + END, False, 2),
    ("no_responders_echo_false", "base", dict(NR, echo=False),
     b"SUB _INBOX.nr8 1\r\nSUB nr8 2\r\nPUB nr8 _INBOX.nr8 2\r\nhi\r\n",
     b"HMSG _INBOX.nr8 1 35 35\r\nNATS/1.0 503\r\nNats-Subject: nr8\r\n\r\n\r\n" + END, False, 2),
    ("no_responders_requires_headers", "base", dict(NR, headers=False), b"",
     b"-ERR 'no responders requires headers support'\r\n", True, 2),
]

def check_exchange(target, case):
    name, config, connect, data, expect_data, expect_closed, pings = case
    got = diff(target, config, name, lambda port: exchange(port, data, connect, pings))
    if target.kind == "nats-server":
        assert (got.data, got.closed) == (expect_data, expect_closed), \
            f"nats-server changed behaviour for {name}: {got!r}"
    auth = "auth_token" in CONFIGS[config] or "user" in CONFIGS[config]
    mp = CONFIGS[config].get("max_payload", 1024 * 1024)
    want = (("auth_required", auth), ("headers", True), ("max_payload", mp), ("proto", 1))
    assert all(i == want for i in got.infos), got.infos


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_exchange(target, case):
    check_exchange(target, case)


# ---- multi-connection and timing cases (in config order) ----------------------------------------

def _by_sid(data: bytes, rename: dict | None = None) -> tuple:
    """MSG/HMSG frames grouped by sid, order kept within a sid (NATS orders messages per
    subscription, not across subscriptions); other frames kept in order apart."""
    rename = rename or {}
    groups: dict[bytes, list[bytes]] = {}
    other = []
    for frame in split_frames(data):
        parts = frame.split(CRLF, 1)[0].split(b" ")
        if parts[0] in (b"MSG", b"HMSG"):
            sid = rename.get(parts[2], parts[2])
            parts[2] = sid
            groups.setdefault(sid, []).append(b" ".join(parts) + CRLF + frame.split(CRLF, 1)[1])
        else:
            other.append(frame)
    return tuple(sorted(groups.items())), tuple(other)


def test_wildcards(target):
    def run(port):
        out = exchange(port, b"SUB wc.* 1\r\nSUB wc.> 2\r\nSUB wc.*.c 3\r\nSUB *.b 4\r\nSUB wc 5\r\n"
                       b"PUB wc.b 1\r\n1\r\nPUB wc.b.c 1\r\n2\r\nPUB wc 1\r\n3\r\nPUB wc.x.c.d 1\r\n4\r\n"
                       b"PUB x.b 1\r\n5\r\nPUB wcx.b 1\r\n6\r\n", C)
        return _by_sid(out.data), out.closed

    diff(target, "base", "wildcards", run, expect=((
        ((b"1", [b"MSG wc.b 1 1\r\n1\r\n"]),
         (b"2", [b"MSG wc.b 2 1\r\n1\r\n", b"MSG wc.b.c 2 1\r\n2\r\n", b"MSG wc.x.c.d 2 1\r\n4\r\n"]),
         (b"3", [b"MSG wc.b.c 3 1\r\n2\r\n"]),
         (b"4", [b"MSG wc.b 4 1\r\n1\r\n", b"MSG x.b 4 1\r\n5\r\n", b"MSG wcx.b 4 1\r\n6\r\n"]),
         (b"5", [b"MSG wc 5 1\r\n3\r\n"])),
        (b"PONG\r\n", I, b"PONG\r\n")), False))


def test_queue_group_one_connection(target):
    # Which member of a group gets a message is random: both queue sids become "Q".
    def run(port):
        msgs = b"".join(b"PUB qg 2\r\n%02d\r\n" % i for i in range(20))
        out = exchange(port, b"SUB qg grp 1\r\nSUB qg grp 2\r\nSUB qg 3\r\n" + msgs, C)
        return _by_sid(out.data, {b"1": b"Q", b"2": b"Q"}), out.closed

    # all 20 to the plain sub, each of the 20 exactly once to the group, in order
    diff(target, "base", "queue_one_conn", run, expect=((
        ((b"3", [b"MSG qg 3 2\r\n%02d\r\n" % i for i in range(20)]),
         (b"Q", [b"MSG qg Q 2\r\n%02d\r\n" % i for i in range(20)])),
        (b"PONG\r\n", I, b"PONG\r\n")), False))


def test_queue_group_across_connections(target):
    def run(port):
        members = [RawConn(port) for _ in range(3)]
        pub = RawConn(port)
        try:
            for i, m in enumerate(members):
                m.handshake(**C)
                m.send(b"SUB qx workers %d\r\nPING\r\n" % (i + 1))
                m.read_until(b"PONG\r\n")
            pub.handshake(**C)
            pub.send(b"".join(b"PUB qx 3\r\n%03d\r\n" % i for i in range(60)) + b"PING\r\n")
            pub.read_until(b"PONG\r\n")
            got = []
            for m in members:
                m.send(b"PING\r\n")
                data = m.read_until(b"PONG\r\n")
                got += [f.split(CRLF)[1] for f in split_frames(data) if f.startswith(b"MSG")]
            return sorted(got), any(m.closed for m in members), pub.closed
        finally:
            for c in members + [pub]:
                c.close()

    diff(target, "base", "queue_across_conns", run,
         expect=([b"%03d" % i for i in range(60)], False, False))


def test_echo_false_other_connection(target):
    def run(port):
        with RawConn(port) as a, RawConn(port) as b:
            a.handshake(**dict(C, echo=False))
            b.handshake(**C)
            a.send(b"SUB eo 1\r\nPUB eo 4\r\nself\r\nPING\r\n")
            first = a.read_until(b"PONG\r\n")
            b.send(b"PUB eo 5\r\nother\r\nPING\r\n")
            b.read_until(b"PONG\r\n")
            a.send(b"PING\r\n")
            second = a.read_until(b"PONG\r\n")
            return first, second, a.closed

    diff(target, "base", "echo_false_other", run,
         expect=(b"PONG\r\n", b"MSG eo 1 5\r\nother\r\nPONG\r\n", False))


def test_hpub_to_subscriber_without_headers(target):
    # A subscriber that did not declare headers gets MSG with the payload only.
    def run(port):
        with RawConn(port) as a, RawConn(port) as b:
            a.handshake(**dict(C, headers=False))
            a.send(b"SUB hx 1\r\nPING\r\n")
            a.read_until(b"PONG\r\n")
            b.handshake(**C)
            b.send(_hpub(b"hx", b"hi") + _hpub(b"hx", b"", reply=b"r") + b"PING\r\n")
            b.read_until(b"PONG\r\n")
            a.send(b"PING\r\n")
            return a.read_until(b"PONG\r\n"), a.closed

    diff(target, "base", "hpub_to_no_headers_sub", run,
         expect=(b"MSG hx 1 2\r\nhi\r\nMSG hx 1 r 0\r\n\r\nPONG\r\n", False))


TOKEN_CASES = [
    # -- auth: token
    ("token_right", "token", dict(C, auth_token="s3cr3t"), b"SUB ta 1\r\nPUB ta 1\r\nx\r\n",
     b"MSG ta 1 1\r\nx\r\n" + END, False, 2),
    ("token_right_verbose", "token", dict(V, auth_token="s3cr3t"), b"", b"+OK\r\n" + END, False, 2),
    ("token_wrong", "token", dict(C, auth_token="nope"), b"", b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("token_missing", "token", C, b"", b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("token_as_user", "token", dict(C, user="s3cr3t"), b"", b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("token_ping_before_connect", "token", None, b"", b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("token_sub_before_connect", "token", None, b"SUB x 1\r\n", b"-ERR 'Authorization Violation'\r\n", True, 2),
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=_ids(TOKEN_CASES))
def test_token_auth(target, case):
    check_exchange(target, case)


def test_auth_timeout(target):
    # token server with auth_timeout 0.5 s: a client that never sends CONNECT is dropped
    def run(port):
        with RawConn(port) as c:
            t0 = time.monotonic()
            data = c.read_until_closed(3.0)
            took = time.monotonic() - t0
            return data, c.closed, 0.3 < took < 1.5

    diff(target, "token", "auth_timeout", run,
         expect=(b"-ERR 'Authentication Timeout'\r\n", True, True))


def _auth_required(port):
    with RawConn(port) as c:
        return bool(c.info.get("auth_required"))


def test_auth_info_token(target):
    diff(target, "token", "auth_info_token", _auth_required, expect=True)


USERPASS_CASES = [
    # -- auth: user + password
    ("userpass_right", "userpass", dict(C, user="alice", **{"pass": "pw"}), b"", END, False, 2),
    ("userpass_wrong_pass", "userpass", dict(C, user="alice", **{"pass": "no"}), b"",
     b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("userpass_wrong_user", "userpass", dict(C, user="bob", **{"pass": "pw"}), b"",
     b"-ERR 'Authorization Violation'\r\n", True, 2),
    ("userpass_token_instead", "userpass", dict(C, auth_token="pw"), b"",
     b"-ERR 'Authorization Violation'\r\n", True, 2),
]


@pytest.mark.parametrize("case", USERPASS_CASES, ids=_ids(USERPASS_CASES))
def test_user_pass_auth(target, case):
    check_exchange(target, case)


def test_auth_info_user_pass(target):
    diff(target, "userpass", "auth_info_userpass", _auth_required, expect=True)


def test_max_connections(target):
    def run(port):
        a, b = RawConn(port), RawConn(port)
        try:
            a.handshake(**C)
            b.handshake(**C)
            with RawConn(port, read_info=False) as c:
                data = c.read_until_closed(3.0)
                refused = (normalise(data, []), c.closed)
            a.close()
            # a freed slot can be used again (allow the server a moment to notice)
            deadline = time.monotonic() + 3.0
            reused = False
            while not reused and time.monotonic() < deadline:
                with RawConn(port) as d:
                    d.send(connect_line(**C) + b"PING\r\n")
                    reused = d.read_until(b"PONG\r\n", 1.0).endswith(b"PONG\r\n")
                if not reused:
                    time.sleep(0.1)
            b.send(b"PING\r\n")
            b_alive = b.read_until(b"PONG\r\n").endswith(b"PONG\r\n")
            return refused, reused, b_alive
        finally:
            a.close()
            b.close()

    # the refused connection gets the INFO line first, then the error, then the close
    diff(target, "maxconn", "max_connections", run,
         expect=((I + b"-ERR 'maximum connections exceeded'\r\n", True), True, True))


def test_server_ping_and_stale_connection(target):
    # ping_interval 1 s, max_pings_out 2: a client that never answers gets PING, PING,
    # then "-ERR 'Stale Connection'" and is closed (about 3 s); a client that answers stays.
    def run(port):
        with RawConn(port) as silent, RawConn(port) as alive:
            silent.handshake(**C)
            alive.handshake(**C)
            t0 = time.monotonic()
            got = b""
            alive_pings = 0
            while not silent.closed and time.monotonic() - t0 < 6.0:
                r, _, _ = select.select([silent.sock, alive.sock], [], [], 0.2)
                if silent.sock in r:
                    silent._fill(0)
                    got += silent._take()
                if alive.sock in r:
                    alive._fill(0)
                    n = alive._take().count(b"PING\r\n")
                    alive_pings += n
                    alive.send(b"PONG\r\n" * n)
            took = time.monotonic() - t0
            alive.send(b"PING\r\n")
            alive_ok = alive.read_until(b"PONG\r\n").endswith(b"PONG\r\n")
            return got, silent.closed, 2.0 < took < 4.5, alive_pings >= 2, alive_ok

    diff(target, "ping", "ping_stale", run,
         expect=(b"PING\r\nPING\r\n-ERR 'Stale Connection'\r\n", True, True, True, True))


def test_slow_consumer(target):
    # A subscriber that stops reading is cut off once more than max_pending (256 KiB) is
    # queued for it; the publisher and other clients keep working. Only the outcome is
    # compared, not bytes: how much the slow client got before the cut depends on the
    # kernel's socket buffers. nats-server sends no -ERR here, it just closes.
    total_msgs = 16000  # 16 MiB of 1 KiB messages, far more than socket buffers hold

    def run(port):
        with RawConn(port, rcvbuf=16384) as slow, RawConn(port) as pub, RawConn(port) as other:
            slow.handshake(**C)
            slow.send(b"SUB slow 1\r\nPING\r\n")
            slow.read_until(b"PONG\r\n")
            other.handshake(**C)
            other.send(b"SUB other 1\r\nPING\r\n")
            other.read_until(b"PONG\r\n")
            pub.handshake(**C)
            chunk = b"".join(b"PUB slow 1024\r\n" + b"x" * 1024 + b"\r\n" for _ in range(100))
            for _ in range(total_msgs // 100):
                if not pub.send(chunk, timeout=15.0):
                    break
            pub.send(b"PUB other 2\r\nok\r\nPING\r\n")
            pub_ok = pub.read_until(b"PONG\r\n", 10.0).endswith(b"PONG\r\n")
            other_ok = other.read_until(b"MSG other 1 2\r\nok\r\n", 5.0).endswith(b"ok\r\n")
            received = len(slow.read_until_closed(10.0))
            return {"slow_closed": slow.closed,
                    "slow_got_less_than_sent": received < total_msgs * 1024,
                    "publisher_ok": pub_ok and not pub.closed,
                    "other_ok": other_ok and not other.closed}

    diff(target, "slow", "slow_consumer", run, expect={
        "slow_closed": True, "slow_got_less_than_sent": True, "publisher_ok": True, "other_ok": True})
