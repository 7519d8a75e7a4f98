"""Log lines: logfmt, one line per event (the default), and the JSON format carrying the
same fields, one object per line; the level can be changed in place (config reload)."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from mq9 import log


@pytest.fixture
def capture():
    out = io.StringIO()
    root = logging.getLogger()
    level_before = root.level

    def setup(level="debug", fmt="json"):
        log.setup(level, "shard-1", stream=out, fmt=fmt)
        return out

    yield setup
    for h in [h for h in root.handlers if getattr(h, "_mq9", False)]:
        root.removeHandler(h)
    root.setLevel(level_before)


def test_json_lines_have_the_logfmt_fields_in_order(capture):
    out = capture()
    log.info("shard_ready", shard=1, path="/d/x y", ok=True, none=None, ratio=0.5,
             raw=b"\xff", inf=float("inf"), obj=("a", 1), level="spoofed")
    log.bind(cid=9).debug("sub", subject="$mq9.AI.INBOX.m-1.*")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("shard_batch_failed", shard=1)
    logging.getLogger("pysyncobj").warning("lost %d", 3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    docs = [json.loads(line) for line in lines]
    first = docs[0]
    assert list(first)[:4] == ["ts", "level", "proc", "event"]
    assert first["level"] == "info" and first["proc"] == "shard-1" and first["event"] == "shard_ready"
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2025-01-02T03:04:05.678Z")
    assert (first["shard"], first["path"], first["ok"], first["none"], first["ratio"]) == (1, "/d/x y", True, None, 0.5)
    assert first["raw"] == "\\xff" and first["inf"] == "inf" and first["obj"] == "('a', 1)"
    # a field may not overwrite what the line is (its level, process, event)
    assert first["level"] == "info"
    assert docs[1] == {**docs[1], "level": "debug", "event": "sub", "cid": 9,
                       "subject": "$mq9.AI.INBOX.m-1.*"}
    assert docs[2]["level"] == "error" and docs[2]["error"] == "ValueError: bad\nthing"
    assert docs[2]["traceback"].startswith("Traceback") and docs[2]["shard"] == 1
    assert {k: docs[3][k] for k in ("level", "event", "logger", "msg")} == {
        "level": "warning", "event": "log", "logger": "pysyncobj", "msg": "lost 3"}


def test_logfmt_stays_the_default(capture):
    out = capture(fmt="logfmt")
    log.info("x", a=1)
    assert out.getvalue().split(" ", 1)[1] == "level=info proc=shard-1 event=x a=1\n"


def test_set_level_takes_effect_at_once(capture):
    out = capture(level="info")
    log.debug("hidden")
    log.set_level("debug")
    log.debug("shown")
    log.set_level("error")
    log.warning("hidden_too")
    assert log.level() == "error"
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]


def test_unknown_format_or_level_is_a_clear_error():
    with pytest.raises(ValueError, match="log format must be one of logfmt, json"):
        log.setup("info", "x", fmt="xml")
    with pytest.raises(ValueError, match="log level must be one of"):
        log.set_level("loud")


def test_log_lines_are_logfmt_one_per_event():
    out = io.StringIO()
    root = logging.getLogger()
    level_before = root.level
    log.setup("debug", "gateway-3", stream=out)
    try:
        log.info("client_connected", cid=7, addr="127.0.0.1:5000", name="a b", quote='say "hi"',
                 empty="", none=None, ok=True, ratio=0.5, raw=b"\xff")
        log.bind(cid=9).debug("sub", subject="$mq9.AI.INBOX.m-1.*")
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("client_parser_failure", cid=9)
        logging.getLogger("pysyncobj").warning("lost %d", 3)
    finally:
        for h in [h for h in root.handlers if getattr(h, "_mq9", False)]:
            root.removeHandler(h)
        root.setLevel(level_before)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert re.match(r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info proc=gateway-3 "
                    r"event=client_connected cid=7 addr=127.0.0.1:5000 name=\"a b\" "
                    r"quote=\"say \\\"hi\\\"\" empty=\"\" none=null ok=true ratio=0.5 raw=\"\\\\xff\"$",
                    lines[0]), lines[0]
    assert lines[1].endswith("level=debug proc=gateway-3 event=sub cid=9 subject=$mq9.AI.INBOX.m-1.*")
    assert "level=error" in lines[2] and "event=client_parser_failure cid=9" in lines[2]
    assert 'error="ValueError: bad\\nthing"' in lines[2] and "traceback=\"Traceback" in lines[2]
    assert lines[3].endswith('level=warning proc=gateway-3 event=log logger=pysyncobj msg="lost 3"')


def test_log_setup_rejects_unknown_level():
    with pytest.raises(ValueError):
        log.setup("loud", "x")
