"""Structured logging: one line per event, logfmt (default) or JSON (``--log-format json``).

    ts=2025-01-02T03:04:05.678Z level=info proc=gateway-1 event=client_connected cid=7 addr=127.0.0.1:50312
    {"ts":"2025-01-02T03:04:05.678Z","level":"info","proc":"gateway-1","event":"client_connected","cid":7,...}

Both formats carry the same fields in the same order; JSON is for log shippers that would
otherwise need a logfmt parser.

Every process of a node writes to the same inherited stderr, so each line names its process
(``proc``); one line per event (tracebacks included, escaped) keeps lines from different
processes from interleaving and lets ``grep``/log shippers split them. Usage::

    from mq9 import log
    log.info("shard_ready", shard=0, path=path)
    conn_log = log.bind(cid=7)          # fields repeated on every line
    conn_log.exception("client_parser_failure")

It sits on the stdlib ``logging`` module, so records from libraries (asyncio, pysyncobj)
come out in the same format, with ``event=log logger=<name> msg=...``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from types import TracebackType
from typing import TextIO

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "critical"}

_logger = logging.getLogger("mq9")
_JsonValue = str | int | float | bool | None
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
_BARE = re.compile(r'^[^\s="\\\x00-\x1f\x7f]+$')
_BAD_KEY = re.compile(r"[^A-Za-z0-9_.\-]")
_proc = "mq9"


def _value(v: object) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is int or type(v) is float:
        return repr(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        text = bytes(v).decode("utf-8", "backslashreplace")
    else:
        text = v if isinstance(v, str) else str(v)
    if _BARE.match(text):
        return text
    # JSON string quoting escapes exactly what logfmt parsers expect: quotes, backslashes,
    # newlines and other control characters.
    return json.dumps(text, ensure_ascii=False)


def _key(k: str) -> str:
    return _BAD_KEY.sub("_", k) or "_"


class LogfmtFormatter(logging.Formatter):
    def __init__(self, proc: str):
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z",
                 f"level={_NAMES.get(record.levelno, str(record.levelno).lower())}",
                 f"proc={_value(self.proc)}"]
        fields = getattr(record, "mq9_fields", None)
        if fields is None:
            parts.append("event=log")
            parts.append(f"logger={_value(record.name)}")
            parts.append(f"msg={_value(record.getMessage())}")
        else:
            parts.append(f"event={_value(record.msg)}")
            for k, v in fields.items():
                parts.append(f"{_key(k)}={_value(v)}")
        if record.exc_info and record.exc_info[0] is not None:
            etype, evalue, tb = record.exc_info
            parts.append(f"error={_value(f'{etype.__name__}: {evalue}')}")
            parts.append(f"traceback={_value(''.join(traceback.format_exception(etype, evalue, tb)).rstrip())}")
        elif record.stack_info:
            parts.append(f"stack={_value(record.stack_info)}")
        return " ".join(parts)


class JsonFormatter(LogfmtFormatter):
    """The same fields as ``LogfmtFormatter``, as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, _JsonValue] = {"ts": f"{ts}.{int(record.msecs):03d}Z",
               "level": _NAMES.get(record.levelno, str(record.levelno).lower()),
               "proc": self.proc}
        fields = getattr(record, "mq9_fields", None)
        if fields is None:
            doc.update(event="log", logger=record.name, msg=record.getMessage())
        else:
            doc["event"] = str(record.msg)
            for k, v in fields.items():
                # the fixed keys come first and stay what they say, as in logfmt
                doc.setdefault(_key(k), _json_value(v))
        if record.exc_info and record.exc_info[0] is not None:
            etype, evalue, tb = record.exc_info
            doc["error"] = f"{etype.__name__}: {evalue}"
            doc["traceback"] = "".join(traceback.format_exception(etype, evalue, tb)).rstrip()
        elif record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _json_value(v: object) -> _JsonValue:
    if v is None or v is True or v is False or type(v) is int:
        return v
    if type(v) is float:
        return v if v == v and v not in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    return v if isinstance(v, str) else str(v)


FORMATS = {"logfmt": LogfmtFormatter, "json": JsonFormatter}


class Logger:
    """Emits events; ``bind`` returns a logger that adds fixed fields to each line."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, object] | None = None):
        self.fields = fields or {}

    def bind(self, **fields: object) -> Logger:
        return Logger({**self.fields, **fields})

    def _emit(self, level: int, event: str, fields: dict[str, object], exc_info: _ExcInfo | None = None) -> None:
        if self.fields:
            fields = {**self.fields, **fields}
        # stacklevel points funcName/lineno at the caller of info()/error(), not at us
        _logger.log(level, event, extra={"mq9_fields": fields}, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: object) -> None:
        if _logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        if _logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        if _logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        if _logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: object) -> None:
        """An error with the exception being handled (call it from an ``except`` block)."""
        if _logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields, exc_info=sys.exc_info())

    def enabled(self, level: str) -> bool:
        """Lets hot paths skip building expensive fields."""
        return _logger.isEnabledFor(_LEVELS[level])


_root = Logger()
bind = _root.bind
debug = _root.debug
info = _root.info
warning = _root.warning
error = _root.error
exception = _root.exception
enabled = _root.enabled


def proc() -> str:
    return _proc


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``setup`` installs, told apart from others' by its class."""


def setup(level: str = "info", proc: str = "mq9", stream: TextIO | None = None, fmt: str = "logfmt") -> None:
    """Send every log record of this process to ``stream`` (stderr) as ``fmt`` (logfmt |
    json).

    Call once per process, first thing; calling again replaces the previous setup (only
    ours: handlers others installed, such as pytest's capture, are kept).
    """
    global _proc
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _proc = proc
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(FORMATS[fmt](proc))
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # Without this, a record from a warnings.warn() would bypass the format.
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """Change this process's level in place (config reload)."""
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    logging.getLogger().setLevel(_LEVELS[level])


def level() -> str:
    return _NAMES.get(logging.getLogger().level, "info")
