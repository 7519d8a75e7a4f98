"""Bad input never crashes the broker, never goes unanswered, never leaks a Python error.

SPEC §2: errors are JSON replies ``{"error": "<readable text>", "code": "<machine code>"}``;
malformed JSON, wrong types and unknown ``type`` values get ``bad_request``, never a crash
or a silent default. SPEC §1: the limits nats-server has (slow consumers are cut off and do
not grow the broker's memory without bound).

- every ``$mq9.AI`` request subject with malformed bodies and wrong field types (a matrix,
  one connection per case so a case that gets its connection closed is seen as such);
- a hypothesis test: random bodies to random ``$mq9.AI.*`` request subjects;
- raw-socket garbage on many connections: no process dies, no exception reaches the
  gateway's last-resort handler, a normal client is served afterwards;
- a subscriber that stops reading while another client publishes a lot: it is cut off, the
  publisher carries on, the node's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import string
import time

import nats
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.errors import TimeoutError as NatsTimeout
from natsraw import RawConn, split_frames
from nodeproc import Node, tcp_row

from mq9 import procfs

pytestmark = pytest.mark.timeout(60)

T = 5.0
# The gateway answers `unavailable` itself when a shard has not answered within 5 s: waiting
# a little longer than that tells "the broker said unavailable" from "nothing came back".
REPLY_WAIT = 6.5
CODES = {"bad_request", "exists", "not_found", "auth", "too_large", "full", "unavailable"}
OK = "ok"  # in an expected set: a success reply is fine too

BIG = 900 * 1024


# ---- helpers -----------------------------------------------------------------------------


async def _quiet_cb(e):
    pass


async def connect(url, **kw):
    kw.setdefault("connect_timeout", T)
    kw.setdefault("allow_reconnect", False)
    kw.setdefault("error_cb", _quiet_cb)
    return await nats.connect(url, **kw)


async def create(nc, **body) -> dict:
    resp = await nc.request("$mq9.AI.MAILBOX.CREATE", json.dumps(body).encode(), timeout=T)
    reply = json.loads(resp.data)
    assert "error" not in reply, reply
    return reply


def success_ok(subject: str, reply: dict) -> bool:
    """A success reply has the fields the operation answers with."""
    if subject == "$mq9.AI.MAILBOX.CREATE":
        return {"mail_id", "token", "type", "ttl", "expires_at"} <= set(reply)
    if subject.startswith("$mq9.AI.MAILBOX.QUERY."):
        return {"mail_id", "unread", "messages"} <= set(reply)
    if subject.startswith("$mq9.AI.INBOX."):
        return {"mail_id", "msg_id", "priority"} <= set(reply)
    return True  # DELETE answers with what it likes on success


def judge(subject: str, body: bytes, outcome, expected: set[str] | None) -> str | None:
    """None if ``outcome`` (reply bytes or an exception) is acceptable, else why not."""
    case = f"{subject} {body[:70]!r}{'...' if len(body) > 70 else ''}"
    if isinstance(outcome, BaseException):
        if isinstance(outcome, NatsTimeout):
            return f"{case}: no reply in time"
        if isinstance(outcome, nats.errors.NoRespondersError):
            return f"{case}: no responders (handled as a plain NATS subject, not answered)"
        return f"{case}: {type(outcome).__name__}: {outcome} (connection closed by the broker?)"
    data = outcome
    if b"Traceback" in data or b"Error:" in data:
        return f"{case}: reply leaks a Python error: {data[:300]!r}"
    try:
        reply = json.loads(data)
    except ValueError:
        return f"{case}: reply is not JSON: {data[:200]!r}"
    if not isinstance(reply, dict):
        return f"{case}: reply is not a JSON object: {data[:200]!r}"
    if "error" in reply or "code" in reply:
        code = reply.get("code")
        if not isinstance(reply.get("error"), str) or not reply["error"] or code not in CODES:
            return f"{case}: malformed error reply {reply}"
        if code == "unavailable":
            return f"{case}: 'unavailable' (the shard never answered): {reply}"
        if expected is not None and code not in expected:
            return f"{case}: code {code!r}, expected one of {sorted(expected)}: {reply}"
        return None
    if expected is not None and OK not in expected:
        return f"{case}: accepted, expected an error {sorted(expected)}: {data[:200]!r}"
    if not success_ok(subject, reply):
        return f"{case}: success reply without the expected fields: {reply}"
    return None


async def ask(url: str, subject: str, body: bytes, wait: float = REPLY_WAIT):
    """Reply bytes, or the exception, of one request on a connection of its own."""
    try:
        nc = await connect(url)
    except Exception as e:  # noqa: BLE001 - the node refusing connections is an outcome too
        return e
    try:
        return (await nc.request(subject, body, timeout=wait)).data
    except Exception as e:  # noqa: BLE001
        return e
    finally:
        try:
            await asyncio.wait_for(nc.close(), T)
        except Exception:  # noqa: BLE001, S110 - the broker may have closed it already
            pass


def log_since(node: Node, offset: int) -> list[str]:
    return node.log_text()[offset:].splitlines()


# lines of the node's log that mean a Python exception happened where none should
_EXC_EVENTS = re.compile(r"event=(child_crashed|child_died|client_parser_failure|supervisor_failed)"
                         r"|logger=asyncio|Traceback")


def exception_lines(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if _EXC_EVENTS.search(line):
            m = re.search(r'error="([^"]*)"', line)
            ev = re.search(r"event=(\S+)", line)
            where = re.findall(r'File \\"/work/main/([^\\]+)\\", line (\d+)', line)
            out.append(f"{ev.group(1) if ev else '?'}: {m.group(1) if m else line[:200]}"
                       + (f" at {where[-1][0]}:{where[-1][1]}" if where else ""))
    return out


async def round_trip(url: str) -> None:
    """A normal client: create, send (acked), receive as owner, plain pub/sub."""
    nc = await connect(url)
    try:
        box = await create(nc, ttl=60)
        ack = json.loads((await nc.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal", b"hello",
                                           timeout=T)).data)
        assert "msg_id" in ack, ack
        sub = await nc.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*")
        assert (await sub.next_msg(timeout=T)).data == b"hello"
        plain = await nc.subscribe("rt.check")
        await nc.flush(timeout=T)
        await nc.publish("rt.check", b"x")
        assert (await plain.next_msg(timeout=T)).data == b"x"
    finally:
        await nc.close()


# ---- the bodies --------------------------------------------------------------------------

INVALID_JSON = [b"{", b"}", b"not json", b'{"ttl": }', b'{"a":1}}', b"{'ttl': 60}",
                b'{"ttl": 60,}', b"[1, 2", b'"unterminated', b"nul\x00l", b"{\x00}",
                b"\xff\xfe\xfd", b'{"name": "\xff"}', b'{"type": "stand\xc3"}',
                b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's recursion limit
                b'{"a":' * 50_000 + b"1" + b"}" * 50_000]
NOT_OBJECTS = [b"[]", b"[1, 2, 3]", b'[{"ttl": 60}]', b'"a string"', b"42", b"-1", b"3.14",
               b"true", b"false", b"null"]
BIG_BODIES = [b"{" + b" " * BIG, b"\xff" * BIG, json.dumps({"name": "a" * BIG}).encode(),
              json.dumps({"token": "t" * BIG}).encode()]
WRONG_NAMES = ["", " ", "a b", "a*", "*", ">", "a.>", "a.*", "#", "a#", "a..b", ".a", "a.",
               "x" * 129, "x" * 10_000, "ä", "a/b", "a\u0000b", "a\tb", "\ud800", "m-\udcff",
               1, 1.5, True, [], ["a"], {"a": 1}]
HUGE_INTS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**400]


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def create_cases() -> list[tuple[bytes, set[str]]]:
    bad = {"bad_request"}
    cases = [(b, bad) for b in INVALID_JSON + NOT_OBJECTS]
    cases += [(b, {"bad_request", "too_large"}) for b in BIG_BODIES[:3]]
    cases.append((BIG_BODIES[3], {"bad_request", "too_large", OK}))  # an unknown field
    cases.append((b"\xef\xbb\xbf{}", {"bad_request", OK}))  # a UTF-8 BOM may be ignored
    for ttl in ["60", "abc", "", 1.5, 3600.5, True, False, -1, -(2**63), -(10**30), [], [60],
                {"s": 60}]:
        cases.append((_j({"ttl": ttl}), bad))
    for ttl in HUGE_INTS:  # whether a huge TTL is refused or kept, it must be answered
        cases.append((_j({"ttl": ttl}), {"bad_request", OK}))
    cases += [(b'{"ttl": NaN}', bad), (b'{"ttl": Infinity}', bad), (b'{"ttl": -Infinity}', bad),
              (b'{"ttl": 1e400}', bad), (b'{"ttl": 60.0}', {"bad_request", OK})]
    for typ in ["fifo", "", "STANDARD", "Latest", " standard", 1, True, [], ["latest"], {}]:
        cases.append((_j({"type": typ}), bad))
    for name in WRONG_NAMES:
        cases.append((_j({"name": name}), bad))
    cases.append((_j({"ttl": "x", "type": "y", "name": "*"}), bad))
    cases.append((_j({"type": "latest", "ttl": -5}), bad))
    return cases


def token_bodies(valid_token: str) -> list[tuple[bytes, set[str]]]:
    auth = {"auth", "bad_request"}
    out = [(_j({}), auth), (_j({"token": None}), auth)]
    for tok in [12345, 1.5, True, [], [valid_token], {"t": valid_token}, "", "\ud800",
                valid_token + "x", valid_token.upper(), valid_token[:-1], " " + valid_token]:
        out.append((_j({"token": tok}), auth))
    return out


def query_cases(token: str) -> list[tuple[bytes, set[str]]]:
    bad = {"bad_request"}
    cases = [(b, bad) for b in INVALID_JSON + NOT_OBJECTS]
    cases += [(b, {"bad_request", "too_large", "auth"}) for b in BIG_BODIES]
    for limit in [0, 1001, -1, "x", "10", 1.5, True, [], {}, 10**30, 2**64]:
        cases.append((_j({"token": token, "limit": limit}), bad))
    for mark in ["yes", "true", 1, 0, [], {}]:
        cases.append((_j({"token": token, "mark_read": mark}), bad))
    cases += token_bodies(token)
    return cases


def delete_cases(token: str) -> list[tuple[bytes, set[str]]]:
    cases = [(b, {"bad_request"}) for b in INVALID_JSON + NOT_OBJECTS]
    cases += [(b, {"bad_request", "too_large", "auth"}) for b in BIG_BODIES]
    cases += token_bodies(token)
    return cases


BAD_IDS = ["a*", "*", ">", "a..b", ".a", "a.", "x" * 129, "a#b", "ä", "-" * 129]


# ---- the matrix --------------------------------------------------------------------------


async def test_malformed_requests_get_json_errors(shared_node):
    url = shared_node.url
    pids = shared_node.pids()
    offset = len(shared_node.log_text())
    nc = await connect(url)
    box = await create(nc, ttl=3600)
    mail_id, token = box["mail_id"], box["token"]
    missing = "m-" + "a" * 24  # valid, nobody created it
    await nc.close()

    cases: list[tuple[str, bytes, set[str] | None]] = []
    for body, exp in create_cases():
        cases.append(("$mq9.AI.MAILBOX.CREATE", body, exp))
    for body, exp in query_cases(token):
        cases.append((f"$mq9.AI.MAILBOX.QUERY.{mail_id}", body, exp))
        cases.append((f"$mq9.AI.MAILBOX.QUERY.{missing}", body, exp | {"not_found"}))
    for body, exp in delete_cases(token):
        cases.append((f"$mq9.AI.MAILBOX.DELETE.{mail_id}", body, exp))
        cases.append((f"$mq9.AI.MAILBOX.DELETE.{missing}", body, exp | {"not_found"}))
    for bad_id in BAD_IDS:
        for op in ("QUERY", "DELETE"):
            cases.append((f"$mq9.AI.MAILBOX.{op}.{bad_id}", _j({"token": token}), {"bad_request"}))
        cases.append((f"$mq9.AI.INBOX.{bad_id}.normal", b"{}", {"bad_request"}))
    # sends: the body is the message, any bytes are fine; the subject can be wrong
    for body in [b"", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b"\x00" * 100, b"x" * BIG]:
        cases.append((f"$mq9.AI.INBOX.{mail_id}.normal", body, {OK}))
        cases.append((f"$mq9.AI.INBOX.{missing}.normal", body, {"not_found"}))
    for prio in ["bogus", "URGENT", "Normal", "normal2", "*", ">", "1"]:
        cases.append((f"$mq9.AI.INBOX.{mail_id}.{prio}", b"{}", {"bad_request"}))
    for subject in ["$mq9.AI.INBOX.normal", f"$mq9.AI.INBOX.{mail_id}", "$mq9.AI.INBOX.>",
                    "$mq9.AI.INBOX.*.normal", "$mq9.AI.INBOX..normal", f"$mq9.AI.INBOX.{mail_id}.",
                    "$mq9.AI.INBOX." + "x" * 200 + ".normal"]:
        cases.append((subject, b"{}", {"bad_request"}))

    sem = asyncio.Semaphore(32)

    async def run(case):
        async with sem:
            return await ask(url, case[0], case[1])

    t0 = time.monotonic()
    outcomes = await asyncio.gather(*[run(c) for c in cases])
    elapsed = time.monotonic() - t0
    problems = [p for (s, b, e), o in zip(cases, outcomes) if (p := judge(s, b, o, e))]

    # the node kept serving, no process died, and the mailbox is still there
    await round_trip(url)
    nc = await connect(url)
    q = json.loads((await nc.request(f"$mq9.AI.MAILBOX.QUERY.{mail_id}", _j({"token": token}),
                                     timeout=T)).data)
    await nc.close()
    if "unread" not in q:
        problems.append(f"the mailbox the bad requests were aimed at is gone: {q}")
    if shared_node.pids() != pids:
        problems.append(f"child processes changed: {pids} -> {shared_node.pids()}")
    problems += [f"node log: {x}" for x in exception_lines(log_since(shared_node, offset))]
    assert not problems, (f"{len(problems)} problems in {len(cases)} cases ({elapsed:.1f}s):\n"
                          + "\n".join(problems))
    print(f"{len(cases)} malformed requests answered in {elapsed:.1f}s")


async def test_unknown_mailbox_operation_gets_json_error(shared_node):
    """``$mq9.AI.MAILBOX.<anything else>`` is a request to the broker too: it should be
    answered with ``bad_request``, not left to plain NATS (no responders)."""
    problems = []
    for subject in ["$mq9.AI.MAILBOX.X", "$mq9.AI.MAILBOX.LIST", "$mq9.AI.MAILBOX.CREATE.extra",
                    "$mq9.AI.MAILBOX.QUERY", "$mq9.AI.MAILBOX.DELETE", "$mq9.AI.MAILBOX"]:
        outcome = await ask(shared_node.url, subject, b"{}", wait=2.0)
        if (p := judge(subject, b"{}", outcome, {"bad_request", "not_found"})):
            problems.append(p)
    assert not problems, "\n".join(problems)


async def test_huge_ttl_is_answered_and_crashes_nothing(shared_node):
    """A TTL that does not fit the wire format (msgpack: 64 bits) must be refused with
    ``bad_request`` (or kept): sent one at a time, so each reaches the shard on its own."""
    problems = []
    for ttl in (2**64 - 1, 2**64, 10 * 365 * 86400):
        pids = shared_node.pids()
        body = _j({"ttl": ttl})
        outcome = await ask(shared_node.url, "$mq9.AI.MAILBOX.CREATE", body, wait=2.0)
        if (p := judge("$mq9.AI.MAILBOX.CREATE", body, outcome, {"bad_request", OK})):
            problems.append(p)
        await asyncio.sleep(0.3)
        if shared_node.pids() != pids:
            problems.append(f"ttl={ttl}: a process died: {pids} -> {shared_node.pids()}")
            await asyncio.to_thread(shared_node.wait_ready, 15)
    assert not problems, "\n".join(problems)


# ---- hypothesis: random bodies to random request subjects --------------------------------


_ID_CHARS = string.ascii_letters + string.digits + "-_.*>#$%~äé"


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_random_bodies_to_random_subjects(shared_node):
    url = shared_node.url
    pids = shared_node.pids()
    offset = len(shared_node.log_text())

    async def setup():
        nc = await connect(url)
        try:
            return await create(nc, ttl=3600)
        finally:
            await nc.close()

    box = asyncio.run(setup())
    ids = st.one_of(st.just(box["mail_id"]), st.just("m-" + "b" * 24),
                    st.text(alphabet=_ID_CHARS, min_size=0, max_size=140))
    prios = st.one_of(st.sampled_from(["urgent", "normal", "notify", "*", ">", "", "NORMAL"]),
                      st.text(alphabet=_ID_CHARS, max_size=12))
    subjects = st.one_of(
        st.just("$mq9.AI.MAILBOX.CREATE"),
        ids.map(lambda i: "$mq9.AI.MAILBOX.QUERY." + i),
        ids.map(lambda i: "$mq9.AI.MAILBOX.DELETE." + i),
        st.tuples(ids, prios).map(lambda t: f"$mq9.AI.INBOX.{t[0]}.{t[1]}"),
    )
    nasty_ints = st.sampled_from([0, -1, 1, 1000, 1001, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
                                  2**64 - 1, 2**64, -(2**63) - 1, 10**30])
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | nasty_ints | st.floats() | st.text(max_size=40)
               | st.sampled_from(["\ud800", "a\udcff", "standard", "latest", box["token"]]))
    values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                       scalars, max_size=3)
    fields = st.fixed_dictionaries({}, optional={k: values for k in
                                                 ("type", "ttl", "name", "limit", "mark_read",
                                                  "token")})
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                               | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
    dumped = fields.map(lambda d: json.dumps(d).encode())
    bodies = st.one_of(st.binary(max_size=600), dumped, dumped,  # known fields, twice the weight
                       json_values.map(lambda v: json.dumps(v).encode()),
                       st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
                       st.tuples(st.sampled_from([b"[", b'{"a":']), st.integers(1, 60_000))
                       .map(lambda t: t[0] * t[1]))  # nesting, shallow to very deep
    seen = {"n": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: a hang costs seconds
              suppress_health_check=list(HealthCheck))
    @given(subject=subjects, body=bodies)
    def one(subject, body):
        seen["n"] += 1
        outcome = asyncio.run(ask(url, subject, body, wait=REPLY_WAIT))
        problem = judge(subject, body, outcome, None)
        assert problem is None, problem

    t0 = time.monotonic()
    one()
    elapsed = time.monotonic() - t0
    asyncio.run(round_trip(url))
    assert shared_node.pids() == pids, f"child processes changed: {pids} -> {shared_node.pids()}"
    excs = exception_lines(log_since(shared_node, offset))
    assert not excs, "\n".join(excs)
    print(f"{seen['n']} random requests in {elapsed:.1f}s")


# ---- raw-socket garbage ------------------------------------------------------------------


def garbage_inputs(seed: int = 9) -> list[tuple[str, bytes, bool]]:
    """(label, bytes, connect first). Sent on connections of their own."""
    rnd = random.Random(seed)
    c = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n"
    items = [
        ("PUB huge size", b"PUB x 99999999999999999999\r\n", False),
        ("PUB huge size connected", c + b"PUB x 99999999999999999999\r\nabc\r\n", True),
        ("HPUB hdr > total", c + b"HPUB x 10 5\r\nNATS/1.0\r\n\r\n", True),
        ("HPUB hdr > total, unconnected", b"HPUB x 10 5\r\n", False),
        ("HPUB huge sizes", c + b"HPUB x 99999999999999999999 99999999999999999999\r\n", True),
        ("HPUB negative", c + b"HPUB x -5 -3\r\n", True),
        ("PUB negative", c + b"PUB x -1\r\n", True),
        ("PUB size mismatch", c + b"PUB x 3\r\nabcdef\r\n", True),
        ("SUB negative sid", c + b"SUB x -1\r\n", True),
        ("UNSUB negative", c + b"SUB x 1\r\nUNSUB 1 -5\r\n", True),
        ("UNSUB huge", c + b"SUB x 1\r\nUNSUB 1 99999999999999999999999\r\n", True),
        ("100 KB line", b"A" * 100_000 + b"\r\n", False),
        ("100 KB PUB line", c + b"PUB " + b"s" * 100_000 + b" 1\r\nx\r\n", True),
        ("100 KB CONNECT", b"CONNECT {\"name\":\"" + b"n" * 100_000 + b"\"}\r\n", False),
        ("100 KB without newline", b"PING" * 25_000, False),
        ("NUL bytes", b"\x00" * 5_000, False),
        ("NUL in subject", c + b"PUB a\x00b 3\r\nabc\r\nSUB \x00 1\r\n", True),
        ("NUL in CONNECT", b"CONNECT {\"a\x00\":1}\r\n", False),
        ("partial PUB then close", c + b"PUB x 5\r\nhel", True),
        ("partial HPUB then close", c + b"HPUB x 20 30\r\nNATS/1.0\r\n", True),
        ("partial line then close", c + b"PUB $mq9.AI.MAILBOX.CREA", True),
        ("partial mq9 request then close", c + b"PUB $mq9.AI.MAILBOX.CREATE r 100\r\n{\"ttl\":", True),
        ("CONNECT bad json", b"CONNECT {bad json\r\n", False),
        ("CONNECT not object", b"CONNECT [1,2]\r\n", False),
        ("CONNECT wrong types", (b"CONNECT {\"protocol\":\"x\",\"verbose\":\"yes\",\"headers\":[],"
                                 b"\"echo\":{},\"name\":5,\"lang\":null}\r\nPING\r\n"), False),
        ("CONNECT huge protocol", b"CONNECT {\"protocol\":99999999999999999999999}\r\nPING\r\n", False),
        ("CONNECT deep json", b"CONNECT " + b"[" * 50_000 + b"]" * 50_000 + b"\r\n", False),
        ("server ops from client", c + b"MSG x 1 3\r\nabc\r\nINFO {}\r\n+OK\r\n", True),
        ("-ERR from client", c + b"-ERR 'x'\r\n", True),
        ("empty lines", b"\r\n" * 10_000, False),
        ("lone LFs", b"\n" * 10_000, False),
        ("long subject", c + b"SUB " + b"a." * 3000 + b"a 1\r\n", True),
        ("many tokens", c + b"SUB " + b".".join([b"t"] * 2000) + b" 1\r\nPING\r\n", True),
        ("wildcards everywhere", c + b"SUB >.> 1\r\nSUB *.>.* 2\r\nSUB a.>b 3\r\nPUB > 1\r\nx\r\n"
                                     b"PUB * 1\r\nx\r\nPING\r\n", True),
        ("non-UTF-8 SUB", c + b"SUB \xff\xfe 1\r\nPING\r\n", True),
        ("non-UTF-8 PUB", c + b"PUB \xff\xfe 2\r\nhi\r\nPING\r\n", True),
        ("non-UTF-8 sid", c + b"SUB ok.subject \xff\r\nPING\r\n", True),
        ("non-UTF-8 queue", c + b"SUB ok.subject \xff 1\r\nPING\r\n", True),
        ("non-UTF-8 mq9 subject", c + b"PUB $mq9.AI.INBOX.\xfe.normal 2\r\n{}\r\nPING\r\n", True),
        ("non-UTF-8 reply to mq9", c + b"SUB r\xff 1\r\nPUB $mq9.AI.MAILBOX.CREATE r\xff 2\r\n{}\r\n"
                                       b"PING\r\n", True),
        ("non-UTF-8 owner sub", c + b"SUB $mq9.AI.INBOX.\xff.* 1\r\nPING\r\n", True),
        ("mq9 request, no reply", c + b"PUB $mq9.AI.MAILBOX.CREATE 5\r\n{{{{{\r\n"
                                      b"PUB $mq9.AI.MAILBOX.QUERY.x 1\r\n[\r\nPING\r\n", True),
        ("HPUB garbage headers to mq9", c + b"HPUB $mq9.AI.MAILBOX.CREATE r 12 14\r\n\xff\xfe"
                                            b"garbage\r\n\r\n{}\r\nPING\r\n", True),
        ("HPUB garbage headers", c + b"HPUB x 6 6\r\n\x00\x01\x02\r\n\r\n\r\nPING\r\n", True),
        ("tabs and CRs", c + b"PUB\tx\t\r3\r\nabc\r\nSUB\r\r\n", True),
        ("lower case ops", b"connect {}\r\npub x 1\r\nx\r\nsub x 1\r\nping\r\n", False),
    ]
    for i in range(30):
        items.append((f"random bytes #{i}", rnd.randbytes(rnd.choice([1, 7, 64, 512, 4096, 65536])),
                      False))
    for i in range(10):  # random bytes after a valid CONNECT, and inside a PUB payload
        items.append((f"random after CONNECT #{i}", c + rnd.randbytes(rnd.randint(1, 20000)), True))
        n = rnd.randint(1, 3000)
        items.append((f"random payload #{i}", c + b"PUB rnd.%d %d\r\n" % (i, n) + rnd.randbytes(n)
                      + b"\r\nPING\r\n", True))
    return items


@pytest.fixture(scope="module")
def garbage(shared_node):
    """Sends every garbage input once, on a connection of its own, many at a time; returns
    what the node looked like before and what came back."""
    pids = shared_node.pids()
    offset = len(shared_node.log_text())
    inputs = garbage_inputs()
    conns, answers = [], {}
    t0 = time.monotonic()
    for label, data, _ in inputs:
        c = RawConn(shared_node.port, read_info=False, timeout=T)
        conns.append((label, c))
        try:
            c.send(data, timeout=2.0)
        except TimeoutError:
            answers[label] = b"(broker stopped reading)"
    for label, c in conns:
        if label not in answers:
            answers[label] = c.read_quiet(quiet_ms=30, timeout=1.0)
        c.close()  # a close in the middle of whatever was sent
    return {"pids": pids, "offset": offset, "answers": answers, "n": len(inputs),
            "seconds": time.monotonic() - t0}


async def test_raw_garbage_leaves_every_process_up(shared_node, garbage):
    await asyncio.sleep(0.5)  # a process that is about to die has died
    assert shared_node.running, "the supervisor died\n" + shared_node.log_tail()
    assert shared_node.pids() == garbage["pids"], \
        f"child processes changed: {garbage['pids']} -> {shared_node.pids()}\n" + \
        "\n".join(exception_lines(log_since(shared_node, garbage["offset"])))
    leaks = {k: v[:200] for k, v in garbage["answers"].items() if b"Traceback" in v}
    assert not leaks, leaks
    await round_trip(shared_node.url)
    print(f"{garbage['n']} garbage connections in {garbage['seconds']:.1f}s")


async def test_raw_garbage_raises_no_python_exception(shared_node, garbage):
    """No garbage input reaches the gateway's last-resort handler (``client_parser_failure``)
    or the event loop's exception handler: each is a bug that cost a connection or a frame."""
    await asyncio.sleep(0.3)
    excs = exception_lines(log_since(shared_node, garbage["offset"]))
    assert not excs, f"{len(excs)} exceptions in the node log:\n" + "\n".join(sorted(set(excs)))


# ---- a slow consumer ---------------------------------------------------------------------


def server_side_state(node_port: int, client_port: int) -> str | None:
    """TCP state (hex, 01 = ESTABLISHED) of the broker's end of a connection."""
    row = tcp_row(node_port, client_port)
    return row[3] if row else None


MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_pending_node(tmp_path_factory):
    """A node whose clients may have at most 1 MiB queued before they are cut off."""
    n = Node(tmp_path_factory.mktemp("small-pending"), max_pending=MIB)
    try:
        n.start()
        yield n
    finally:
        n.close()


async def test_slow_consumer_is_cut_off_and_memory_stays_bounded(small_pending_node):
    mib = MIB
    node = small_pending_node
    all_pids = [node.pid] + node.pids()
    base = procfs.rss_bytes(all_pids) // 1024

    # subscribers that never read, with tiny receive buffers (several, so both gateways
    # get some whatever the kernel's spreading)
    slow = []
    for _ in range(4):
        c = RawConn(node.port, rcvbuf=4096, timeout=T)
        c.handshake(headers=True)
        c.send(b"SUB flood.> 1\r\nPING\r\n")
        assert c.read_until(b"PONG\r\n", T).endswith(b"PONG\r\n")
        slow.append((c, c.sock.getsockname()[1]))

    pub = await connect(node.url)
    fast = await connect(node.url)
    check = await fast.subscribe("check.after")
    await fast.flush(timeout=T)

    payload = os.urandom(64 * 1024)
    sent = peak = 0
    t0 = time.monotonic()
    cut_at = None
    flush_worst = 0.0
    while time.monotonic() - t0 < 12 and sent < 400 * mib:
        for _ in range(32):
            await pub.publish("flood.data", payload)
            sent += len(payload)
        f0 = time.monotonic()
        await pub.flush(timeout=T)  # the publisher is never held up for long
        flush_worst = max(flush_worst, time.monotonic() - f0)
        peak = max(peak, procfs.rss_bytes(all_pids) // 1024)
        states = [server_side_state(node.port, port) for _, port in slow]
        if cut_at is None and all(s != "01" for s in states):
            cut_at = sent
        if cut_at is not None and sent >= cut_at + 96 * mib:
            break  # well past the cut: memory had every chance to grow
    elapsed = time.monotonic() - t0

    # the publisher still works: a fast subscriber gets everything published now
    for i in range(100):
        await pub.publish("check.after", b"%d" % i)
    await pub.flush(timeout=T)
    got = [int((await check.next_msg(timeout=T)).data) for _ in range(100)]
    assert got == list(range(100))

    # each slow subscriber was disconnected (what was buffered for it ends in EOF)
    ended = []
    for c, _ in slow:
        data = c.read_until_closed(timeout=T)
        ended.append((c.closed, len(data), b"-ERR" in data, data[-60:] if not c.closed else b""))
        c.close()
    report = (f"published {sent / mib:.0f} MiB in {elapsed:.1f}s, all slow clients cut after "
              f"{(cut_at or 0) / mib:.0f} MiB, worst publisher flush {flush_worst:.2f}s; RSS "
              f"{base / 1024:.0f} MiB -> peak {peak / 1024:.0f} MiB (+{(peak - base) / 1024:.0f})")
    print(report)
    assert cut_at is not None, "slow subscribers were never cut off: " + report
    assert all(e[0] for e in ended), f"slow subscribers still connected: {ended}; {report}"
    assert peak - base < 200 * 1024, "broker memory grew: " + report
    assert node.pids() == sorted(all_pids[1:]), "a process died or restarted\n" + node.log_tail()
    await pub.close()
    await fast.close()


def owner_session(port: int, mail_id: str, limit: float = 8.0) -> tuple[list[int], bool]:
    """One owner subscription over a bare socket, read to the end: every message the broker
    wrote to it (until it closes, or is quiet for a second). Returns (seqs, cut off)."""
    c = RawConn(port, timeout=T)
    try:
        c.handshake(headers=True)
        c.send(f"SUB $mq9.AI.INBOX.{mail_id}.* 1\r\n".encode())
        data = b""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            chunk = c.read_quiet(quiet_ms=1000, timeout=deadline - time.monotonic())
            data += chunk
            if c.closed or not chunk:
                break
        seqs = []
        for frame in split_frames(data):
            if frame.startswith(b"HMSG "):
                head, _, rest = frame.partition(b"\r\n")
                hlen = int(head.split()[-2])
                seqs.append(json.loads(rest[hlen:-2])["seq"])
        return seqs, c.closed
    finally:
        c.close()


async def test_owner_replay_bigger_than_max_pending_loses_nothing(small_pending_node):
    """A reader that reads everything, subscribing to a backlog of 1.2 MB with max_pending
    1 MiB. Whether or not the broker cuts it off on the way, every acknowledged message must
    reach some session: one the broker dropped from a connection it cut was never written
    to it, so it must not count as delivered."""
    node = small_pending_node
    nc = await connect(node.url)
    box = await create(nc, ttl=3600)
    mail_id = box["mail_id"]
    n = 600
    pad = "x" * 2000
    acks = await asyncio.gather(*[
        nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", _j({"seq": i, "pad": pad}), timeout=T)
        for i in range(n)])
    assert all("msg_id" in json.loads(a.data) for a in acks)

    seen: list[int] = []
    sessions = []  # (messages received, cut off by the broker)
    for _ in range(4):  # reconnect after each cut, a bounded number of times
        got, cut = await asyncio.to_thread(owner_session, node.port, mail_id)
        sessions.append((len(got), cut))
        seen += got
        if not cut:
            break  # a session that ended quietly has had everything
    q = json.loads((await nc.request(f"$mq9.AI.MAILBOX.QUERY.{mail_id}",
                                     _j({"token": box["token"], "limit": 1}), timeout=T)).data)
    await nc.close()
    lost = sorted(set(range(n)) - set(seen))
    dups = len(seen) - len(set(seen))
    assert not lost, (f"{len(lost)} of {n} acked messages never delivered (unread now "
                      f"{q.get('unread')}); sessions (received, cut off): {sessions}; "
                      f"duplicates {dups}; first lost seq {lost[:10]}")
    print(f"owner replay under max_pending: sessions (received, cut off) {sessions}")
