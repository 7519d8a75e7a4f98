"""A parser for the client-to-server side of the NATS protocol.

``Parser.feed`` takes the byte stream in whatever pieces the socket delivers and calls the
handler's ``op_*`` methods synchronously, in stream order. It is the hot path of the broker:
a PUB or HPUB written the way client libraries write it (upper case, single spaces) is
taken apart by one precompiled regular expression match and slices, without leaving the
inner loop; everything else goes line by line with ``find``. The result never depends on
how the stream was split into chunks.

What the parser does on malformed input copies nats-server v2.15.1, measured with raw
sockets (the texts live in ``errors``; ``""`` means "closes without sending -ERR"):

- unknown op, or a known op not followed by what it needs (``PUB\\r\\n``, ``PUBX``,
  ``-ERR\\r\\n``, ``MSG``, an empty line, a leading space): ``Unknown Protocol Operation``,
  closes. nats-server decides on the first impossible byte, before the line ends; so does
  this parser.
- ops are case-insensitive per letter (``pUb``); the line may end in ``\\n`` alone.
- PING/PONG/+OK ignore anything after the op up to the newline (``PINGX`` gets a PONG).
  ``+OK`` and ``INFO {...}`` from a client are ignored; INFO whose argument is not a JSON
  object (or ``null``) closes silently; ``-ERR ...`` from a client closes silently.
- wrong argument count for PUB/HPUB/SUB/UNSUB (``PUB a``, ``PUB a b c 2``, ``SUB a``,
  ``UNSUB 1 2 3``, ``PUB \\r\\n``): closes with nothing sent.
- size not 1-9 ASCII digits (``x``, ``-1``, ``+2``, ``0000000002``): closes, nothing sent.
  HPUB header size > total size: closes, nothing sent.
- size (HPUB: total size) > max_payload: ``Maximum Payload Violation``, closes, decided on
  the PUB line before any payload is read. A size equal to max_payload is fine.
- payload not followed by exactly ``\\r\\n``: ``Unknown Protocol Operation``, closes.
- UNSUB max that is not a positive number (``0``, ``-1``, ``x``) unsubscribes at once,
  so it is reported as ``None``.
- separators: PUB/HPUB split on space and tab only (a CR inside stays in the subject);
  SUB/UNSUB split on space, tab, CR and LF. Repeated separators are fine.
- the first byte after the op's blanks starts the arguments unexamined, even an LF
  (``SUB \ns.> 1\r\n`` subscribes); and once a CR has been seen in the arguments, the
  byte before the LF is dropped whatever it is (``SUB a 1\rX\n`` is ``SUB a 1``).
  nats-server differs from this only when such a line (CR inside the arguments) is split
  across two socket reads: it then omits the CRs after the split and drops nothing, so its
  outcome depends on the kernel's segmentation and cannot be matched.
- control line: arguments longer than max_control_line give ``maximum control line
  exceeded`` (lower case in 2.15) and close. nats-server only checks a line that is still
  incomplete at the end of a socket read, but since it starts with 512-byte reads, any
  long line on a fresh connection trips it in practice; this parser applies the limit to
  complete lines too, so the outcome does not depend on how the kernel split the stream.
  Text after PING/PONG/+OK is not a control line (nats-server skips it without limit).

Subjects, replies, queues and sids are decoded as UTF-8; bytes that are not UTF-8
(nats-server accepts and routes them) come through with ``surrogateescape``, so encode
them back with ``errors="surrogateescape"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

import msgspec

from mq9.protocol import errors


class Handler(Protocol):
    """What the parser calls, in stream order (``gateway.client.Client``). A handler may
    also have ``op_pubs`` (``PubsHandler``); without it a run comes one PUB at a time."""

    def op_connect(self, args: bytes, /) -> None: ...
    def op_pub(self, subject: str, reply: str | None, payload: bytes, /) -> None: ...
    def op_hpub(self, subject: str, reply: str | None, headers: bytes, payload: bytes, /) -> None: ...
    def op_sub(self, subject: str, queue: str | None, sid: str, /) -> None: ...
    def op_unsub(self, sid: str, max_msgs: int | None, /) -> None: ...
    def op_ping(self) -> None: ...
    def op_pong(self) -> None: ...
    def protocol_error(self, text: str, /) -> None: ...


# op_pubs(subject, replies, payloads): ``replies`` None when no PUB of the run has a reply,
# else one per payload.
OpPubs = Callable[[str, "list[str | None] | None", list[bytes]], None]


class _Follow(IntEnum):
    """What follows an op name before its arguments."""
    SEP = 0  # a space or tab is required (PUB, HPUB, SUB, UNSUB, -ERR)
    ANY = 1  # anything; leading blanks are skipped (CONNECT, INFO: "CONNECT{}" is accepted)
    IGN = 2  # the rest of the line is ignored (PING, PONG, +OK)


class _Op(IntEnum):
    PUB = 0
    HPUB = 1
    SUB = 2
    UNSUB = 3
    PING = 4
    PONG = 5
    CONNECT = 6
    INFO = 7
    OK = 8
    ERR = 9


# (name, op, what follows the name): a plain tuple, not a NamedTuple, because CPython
# unpacks an exact tuple faster, and each control line unpacks one.
_OpName = tuple[bytes, _Op, _Follow]


# Module-level names: the line loop compares against them without an attribute lookup.
_SEP, _ANY, _IGN = _Follow.SEP, _Follow.ANY, _Follow.IGN
_PUB, _HPUB, _SUB, _UNSUB, _PING, _PONG, _CONNECT, _INFO = (
    _Op.PUB, _Op.HPUB, _Op.SUB, _Op.UNSUB, _Op.PING, _Op.PONG, _Op.CONNECT, _Op.INFO)

_OPS_BY_FIRST: dict[int, tuple[_OpName, ...]] = {
    ord("P"): ((b"PUB", _PUB, _SEP), (b"PING", _PING, _IGN),
               (b"PONG", _PONG, _IGN)),
    ord("H"): ((b"HPUB", _HPUB, _SEP),),
    ord("S"): ((b"SUB", _SUB, _SEP),),
    ord("U"): ((b"UNSUB", _UNSUB, _SEP),),
    ord("C"): ((b"CONNECT", _CONNECT, _ANY),),
    ord("I"): ((b"INFO", _INFO, _ANY),),
    ord("+"): ((b"+OK", _Op.OK, _IGN),),
    ord("-"): ((b"-ERR", _Op.ERR, _SEP),),
}


# PUB and HPUB as client libraries write them: upper case, single spaces, sizes of 1-9
# digits. Whatever these do not match (tabs, lower case, odd arguments, errors) goes through
# ``_line``, which gives the same result for these lines, only slower.
_FAST_PUB = re.compile(rb"PUB ([^ \t\r\n]+) (?:([^ \t\r\n]+) )?([0-9]{1,9})\r?\n")
_FAST_HPUB = re.compile(
    rb"HPUB ([^ \t\r\n]+) (?:([^ \t\r\n]+) )?([0-9]{1,9}) ([0-9]{1,9})\r?\n")
_BLANKS = re.compile(rb"[ \t]*")

# Longest run handed over at once: long enough to pay the per-call costs once for many
# messages, short enough that the shard starts storing the first run of a large read
# while the gateway is still parsing the rest.
RUN_MAX = 128


def _lookup(head: bytes) -> _OpName | None:
    """The op that ``head``, the upper-cased start of a line (at most 8 bytes, longer than
    any op), starts with."""
    cands = _OPS_BY_FIRST.get(head[0])
    if cands is not None:
        for op in cands:
            if head.startswith(op[0]):
                return op
    return None


def _op_prefix(head: bytes) -> bool:
    """Whether ``head`` (upper case, shorter than any op it starts) may still become an op."""
    return any(op[0].startswith(head) for op in _OPS_BY_FIRST.get(head[0], ()))


def _split_pub(args: bytes) -> list[bytes]:
    return [a for a in args.replace(b"\t", b" ").split(b" ") if a]


def _split_sub(args: bytes) -> list[bytes]:
    # nats-server's generic argument splitter (SUB, UNSUB) also breaks on CR and LF.
    args = args.replace(b"\t", b" ").replace(b"\r", b" ").replace(b"\n", b" ")
    return [a for a in args.split(b" ") if a]


def _size(b: bytes) -> int:
    # nats-server's parseSize: at most 9 ASCII digits; bytes.isdigit is ASCII-only, and
    # int() alone would take "+2", " 2" and "2_0".
    if len(b) < 10 and b.isdigit():
        return int(b)
    return -1


def _dec(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("utf-8", "surrogateescape")


class Parser:
    """Incremental parser; ``feed`` any split of the stream.

    After ``protocol_error`` (or ``stop()``) all further input, including the rest of the
    chunk being parsed, is ignored. An exception raised by a handler method propagates
    out of ``feed`` and also stops the parser. ``max_payload`` and ``max_control_line``
    may be changed between ``feed`` calls. ``reason`` holds a log-friendly description of
    the last protocol error (nats-server logs one even when it sends nothing).
    """

    __slots__ = (
        "max_payload", "max_control_line", "reason",
        "_buf", "_need", "_dead",
        "_connect", "_pub", "_pubs", "_hpub", "_sub", "_unsub", "_ping", "_pong", "_perr",
    )

    _connect: Callable[[bytes], None]
    _pub: Callable[[str, str | None, bytes], None]
    _pubs: OpPubs
    _hpub: Callable[[str, str | None, bytes, bytes], None]
    _sub: Callable[[str, str | None, str], None]
    _unsub: Callable[[str, int | None], None]
    _ping: Callable[[], None]
    _pong: Callable[[], None]
    _perr: Callable[[str], None]

    def __init__(self, handler: Handler, max_payload: int = 1048576, max_control_line: int = 4096):
        self.max_payload = max_payload
        self.max_control_line = max_control_line
        self.reason = ""
        # Unparsed tail of the stream; re-parsed only once it holds ``_need`` bytes, so a
        # large payload arriving in many chunks is appended, not re-scanned per chunk.
        self._buf = bytearray()
        self._need = 0
        self._dead = False
        self._connect = handler.op_connect
        self._pub = handler.op_pub
        # A run of PUBs to one subject, in order: op_pubs(subject, replies, payloads),
        # ``replies`` None when none has a reply, else one per payload (str or None).
        # Handlers without ``op_pubs`` get them one by one.
        pubs: OpPubs | None = getattr(handler, "op_pubs", None)
        self._pubs = pubs or self._pubs_one_by_one
        self._hpub = handler.op_hpub
        self._sub = handler.op_sub
        self._unsub = handler.op_unsub
        self._ping = handler.op_ping
        self._pong = handler.op_pong
        self._perr = handler.protocol_error

    def _pubs_one_by_one(self, subject: str, replies: list[str | None] | None, payloads: list[bytes]) -> None:
        for i, p in enumerate(payloads):
            self._pub(subject, None if replies is None else replies[i], p)
            if self._dead:
                return

    @property
    def stopped(self) -> bool:
        return self._dead

    def stop(self) -> None:
        """Ignore all further input, from the next op on (e.g. after an auth failure)."""
        self._dead = True
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        if self._dead:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        try:
            self._parse(data)
        except BaseException:
            self._dead = True
            raise

    def _parse(self, data: bytes) -> None:
        fast = _FAST_PUB.match
        fast_hpub = _FAST_HPUB.match
        find = data.find
        n = len(data)
        pos = 0
        max_payload = self.max_payload
        # Longest matched line whose arguments are within the control line limit.
        fast_len = self.max_control_line + 5
        # Consecutive PUBs to one subject form a run, handed over in one call (publishers
        # stream to a subject; senders pipeline requests to one mailbox); ``replies`` holds
        # their reply subjects (raw) once one has any. ``line`` is the last fast PUB line of
        # the run (set whenever ``run`` is): a byte-identical next line is taken without the
        # regular expression.
        run: list[bytes] | None = None
        replies: list[bytes | None] | None = None
        run_sb: bytes | None = None
        rb: bytes | None = None
        subject = ""
        line = b""
        size = 0
        while pos < n:
            if run is not None and data.startswith(line, pos):
                start = pos + len(line)
                stop = start + size
                if stop + 2 > n or data[stop] != 13 or data[stop + 1] != 10:
                    self._no_payload_end(data, pos, stop, run, subject, replies)
                    return
                run.append(data[start:stop])
                if replies is not None:
                    replies.append(rb)
                pos = stop + 2
                continue
            m = fast(data, pos)
            if m is not None:
                start = m.end()
                if start - pos <= fast_len:
                    sb, rb, sz = m.groups()
                    size = int(sz)
                    if size > max_payload:
                        self._flush_run(run, subject, replies)
                        if not self._dead:
                            self._fail(errors.MAX_PAYLOAD_VIOLATION,
                                       f"maximum payload exceeded: {size} vs {max_payload}")
                        return
                    stop = start + size
                    if stop + 2 > n or data[stop] != 13 or data[stop + 1] != 10:
                        self._no_payload_end(data, pos, stop, run, subject, replies)
                        return
                    if run is None or sb != run_sb or len(run) >= RUN_MAX:
                        if run is not None:
                            self._flush_run(run, subject, replies)
                            if self._dead:
                                return
                        subject = _dec(sb)
                        run_sb = sb
                        run = []
                        replies = None
                    if replies is not None:
                        replies.append(rb)
                    elif rb is not None:
                        replies = [None] * len(run)
                        replies.append(rb)
                    run.append(data[start:stop])
                    line = data[pos:start]
                    pos = stop + 2
                    continue
            if run is not None:
                self._flush_run(run, subject, replies)
                run = replies = None
                if self._dead:
                    return
            if data[pos] == 72:  # H
                m = fast_hpub(data, pos)
                if m is not None:
                    start = m.end()
                    if start - pos <= fast_len + 1:
                        sb, rb, hs, ts = m.groups()
                        hsize = int(hs)
                        hsz = int(ts)
                        if hsize > hsz:
                            self._fail(errors.PARSE_ERROR, "processHeaderPub Header Size "
                                       f"larger then TotalSize: {m[0]!r}")
                            return
                        if hsz > max_payload:
                            self._fail(errors.MAX_PAYLOAD_VIOLATION,
                                       f"maximum payload exceeded: {hsz} vs {max_payload}")
                            return
                        stop = start + hsz
                        if stop + 2 > n:
                            self._await_payload(data, pos, stop)
                            return
                        if data[stop] != 13 or data[stop + 1] != 10:
                            self._fail(errors.UNKNOWN_PROTOCOL_OP, "payload not followed by CRLF")
                            return
                        hstop = start + hsize
                        self._hpub(_dec(sb), None if rb is None else _dec(rb),
                                   data[start:hstop], data[hstop:stop])
                        if self._dead:
                            return
                        pos = stop + 2
                        continue
            nl = find(b"\n", pos)
            if nl < 0:
                self._partial(data, pos)
                return
            pos = self._line(data, pos, nl)
            if pos < 0:
                return
        self._flush_run(run, subject, replies)

    def _no_payload_end(self, data: bytes, pos: int, stop: int, run: list[bytes] | None, subject: str,
                        replies: list[bytes | None] | None) -> None:
        """A PUB whose payload is not followed by CRLF in this chunk: the run before it is
        handed over, then it waits for more bytes or fails."""
        self._flush_run(run, subject, replies)
        if self._dead:
            return
        if stop + 2 > len(data):
            self._await_payload(data, pos, stop)
        else:
            self._fail(errors.UNKNOWN_PROTOCOL_OP, "payload not followed by CRLF")

    def _flush_run(self, run: list[bytes] | None, subject: str, raw_replies: list[bytes | None] | None) -> None:
        if run:
            replies = None if raw_replies is None else [None if r is None else _dec(r) for r in raw_replies]
            if len(run) == 1:
                self._pub(subject, None if replies is None else replies[0], run[0])
            else:
                self._pubs(subject, replies, run)

    def _line(self, data: bytes, pos: int, nl: int) -> int:
        """One op starting at ``pos``, ``nl`` being the first LF after it; returns where the
        next op starts, or -1 to stop parsing this chunk (error, stop, or incomplete)."""
        op = _lookup(data[pos:pos + 8].upper())
        if op is None:
            return self._fail(errors.UNKNOWN_PROTOCOL_OP,
                              f"unknown protocol operation: {data[pos:min(nl, pos + 32)]!r}")
        name, code, kind = op
        if kind is _IGN:
            if code is _PING:
                self._ping()
            elif code is _PONG:
                self._pong()
            return -1 if self._dead else nl + 1
        k = pos + len(name)
        if kind is _SEP:
            # The op name holds no LF, so k <= nl.
            if data[k] != 32 and data[k] != 9:
                return self._fail(errors.UNKNOWN_PROTOCOL_OP,
                                  f"unknown protocol operation: {data[pos:min(nl, pos + 32)]!r}")
            k += 1
        # nats-server skips blanks and starts the arguments at the next byte without
        # looking at it, so "SUB \ns.> 1\r\n" subscribes to s.>: an LF there is not the end.
        blanks = _BLANKS.match(data, k)
        assert blanks is not None  # "[ \t]*" matches the empty string too
        start = blanks.end()
        if start == nl:
            nl = data.find(b"\n", start + 1)
            if nl < 0:
                self._partial(data, pos)
                return -1
        # nats-server drops the byte before the LF if it saw a CR anywhere after the first
        # argument byte, whether or not that byte is the CR ("SUB a 1\rX\n" is "SUB a 1").
        args = data[start:nl - 1 if data.find(b"\r", start + 1, nl) >= 0 else nl]
        if len(args) > self.max_control_line:
            return self._fail(errors.MAX_CONTROL_LINE_EXCEEDED,
                              f"maximum control line exceeded: {len(args)}")
        if code is _PUB:
            return self._msg(data, pos, nl, _split_pub(args), False, args)
        if code is _HPUB:
            return self._msg(data, pos, nl, _split_pub(args), True, args)
        if code is _SUB:
            parts = _split_sub(args)
            if len(parts) == 2:
                self._sub(_dec(parts[0]), None, _dec(parts[1]))
            elif len(parts) == 3:
                self._sub(_dec(parts[0]), _dec(parts[1]), _dec(parts[2]))
            else:
                return self._fail(errors.PARSE_ERROR, f"processSub Parse Error: {args!r}")
        elif code is _UNSUB:
            parts = _split_sub(args)
            if len(parts) == 1:
                self._unsub(_dec(parts[0]), None)
            elif len(parts) == 2:
                max_msgs = _size(parts[1])
                self._unsub(_dec(parts[0]), max_msgs if max_msgs > 0 else None)
            else:
                return self._fail(errors.PARSE_ERROR, f"processUnsub Parse Error: {args!r}")
        elif code is _CONNECT:
            self._connect(args)
        elif code is _INFO:
            # nats-server unmarshals a client's INFO into its Info struct and then ignores
            # it; only JSON that is not an object (or null) is fatal. (It would also reject
            # known fields of the wrong type; that detail is not copied.)
            try:
                ok = type(msgspec.json.decode(args)) in (dict, type(None))
            except Exception:
                ok = False
            if not ok:
                return self._fail(errors.INVALID_CONNECT, f"processInfo: bad JSON {args[:64]!r}")
        else:  # -ERR from a client
            return self._fail(errors.CLIENT_SENT_ERR, f"client sent -ERR {args[:64]!r}")
        return -1 if self._dead else nl + 1

    def _msg(self, data: bytes, pos: int, nl: int, parts: list[bytes], headers: bool,
             args: bytes) -> int:
        if headers:
            if len(parts) == 3:
                subject_b, hsize_b, size_b = parts
                reply_b = None
            elif len(parts) == 4:
                subject_b, reply_b, hsize_b, size_b = parts
            else:
                return self._fail(errors.PARSE_ERROR, f"processHeaderPub Parse Error: {args!r}")
            hsize = _size(hsize_b)
            size = _size(size_b)
            if hsize < 0 or size < 0:
                return self._fail(errors.PARSE_ERROR,
                                  f"processHeaderPub Bad or Missing Size: {args!r}")
            if hsize > size:
                return self._fail(errors.PARSE_ERROR,
                                  f"processHeaderPub Header Size larger then TotalSize: {args!r}")
        else:
            if len(parts) == 2:
                subject_b, size_b = parts
                reply_b = None
            elif len(parts) == 3:
                subject_b, reply_b, size_b = parts
            else:
                return self._fail(errors.PARSE_ERROR, f"processPub Parse Error: {args!r}")
            size = _size(size_b)
            if size < 0:
                return self._fail(errors.PARSE_ERROR, f"processPub Bad or Missing Size: {args!r}")
            hsize = 0
        if size > self.max_payload:
            return self._fail(errors.MAX_PAYLOAD_VIOLATION,
                              f"maximum payload exceeded: {size} vs {self.max_payload}")
        start = nl + 1
        stop = start + size
        if stop + 2 > len(data):
            # Re-parse the whole op, control line included, once the payload is in.
            self._await_payload(data, pos, stop)
            return -1
        if data[stop] != 13 or data[stop + 1] != 10:
            return self._fail(errors.UNKNOWN_PROTOCOL_OP, "payload not followed by CRLF")
        subject = _dec(subject_b)
        reply = None if reply_b is None else _dec(reply_b)
        if headers:
            # Header size 0 is legal; nats-server then delivers a plain MSG, not HMSG.
            self._hpub(subject, reply, data[start:start + hsize], data[start + hsize:stop])
        else:
            self._pub(subject, reply, data[start:stop])
        return -1 if self._dead else stop + 2

    def _await_payload(self, data: bytes, pos: int, stop: int) -> None:
        n = len(data)
        if stop < n and data[stop] != 13:
            # nats-server fails on the first wrong byte after the payload; no need to wait.
            self._fail(errors.UNKNOWN_PROTOCOL_OP, "payload not followed by CRLF")
            return
        self._buf += memoryview(data)[pos:]
        # Come back as soon as the byte after the payload is in, so a wrong one is caught
        # then (as nats-server does), not only once both trailer bytes have arrived.
        self._need = (stop + 2 if stop < n else stop + 1) - pos

    def _partial(self, data: bytes, pos: int) -> None:
        """The chunk ends inside a control line: reject what already cannot be valid, as
        nats-server does byte by byte, and keep the rest (bounded) for the next feed."""
        rest = data[pos:]
        head = rest[:8].upper()
        op = _lookup(head)
        if op is None and not _op_prefix(head):
            self._fail(errors.UNKNOWN_PROTOCOL_OP,
                       f"unknown protocol operation: {rest[:32]!r}")
            return
        if op is not None:
            name, _code, kind = op
            k = len(name)
            if kind is _IGN:
                rest = rest[:k]  # the text after PING/PONG/+OK is skipped, so don't store it
            elif len(rest) > k:
                if kind is _SEP:
                    if rest[k] != 32 and rest[k] != 9:
                        self._fail(errors.UNKNOWN_PROTOCOL_OP,
                                   f"unknown protocol operation: {rest[:32]!r}")
                        return
                    k += 1
                blanks = _BLANKS.match(rest, k)
                assert blanks is not None  # "[ \t]*" matches the empty string too
                start = blanks.end()
                if start == len(rest):
                    rest = rest[:k] if kind is _SEP else rest[:k + 1]
                else:
                    size = len(rest) - start - (1 if rest.find(b"\r", start + 1) >= 0 else 0)
                    if size > self.max_control_line:
                        self._fail(errors.MAX_CONTROL_LINE_EXCEEDED,
                                   f"maximum control line exceeded: {size}")
                        return
        self._buf += rest
        self._need = len(rest) + 1

    def _fail(self, text: str, reason: str) -> int:
        self._dead = True
        self._buf = bytearray()
        self.reason = reason
        self._perr(text)
        return -1
