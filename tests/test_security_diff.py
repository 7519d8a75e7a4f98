"""Permissions, max_subscriptions and TLS refusals: the real nats-server against mq9, byte
for byte.

Both servers get the same users: nats-server as an ``authorization`` block (its config
format reads JSON), mq9 as ``--auth-file users.json``. Each case is a raw exchange on a
connection logged in as one user. The expected bytes written here were learned from
nats-server v2.15.1; the test checks nats-server still says them and that mq9 says the
same. Multi-connection cases (delivery filtered by a subscribe deny, allow_responses)
compare what every connection saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import natsraw  # noqa: E402
from natsraw import RawConn  # noqa: E402
from nodeproc import Node  # noqa: E402

MAX_SUBS = 3


def _bcrypt(pw: str) -> str:
    import bcrypt

    # "$2a$", the prefix nats-server's own tool writes; cost 4 keeps the test fast
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4, prefix=b"2a")).decode()


def users_doc() -> dict:
    return {"users": [
        {"user": "a", "password": "b", "permissions": {
            "publish": {"allow": ["ok.>", "$mq9.AI.>"], "deny": ["ok.no"]},
            "subscribe": {"allow": ["ok.>", "_INBOX.>"], "deny": ["ok.secret", "ok.q.* grp"]}}},
        {"user": "r", "password": "r", "permissions": {
            "publish": {"allow": ["svc.>"]}, "subscribe": ["svc.>"], "allow_responses": True}},
        {"user": "n", "password": "n", "permissions": {"subscribe": {"deny": ["x.>"]}}},
        {"user": "q", "password": "q", "permissions": {"subscribe": {"allow": ["jobs.* workers", "ev.>"]},
                                                        "publish": "jobs.*"}},
        {"user": "h", "password": _bcrypt("hashed"), "permissions": {"publish": ["h.>"]}},
        {"user": "free", "password": "free"},
    ]}


@contextlib.contextmanager
def side_by_side(node: Node, ns: natsraw.NatsServer):
    """Both servers up (mq9 starting while nats-server does): (nats port, mq9 port)."""
    node.start(wait=False)
    ns.start()
    try:
        node.wait_ready()
        yield ns.port, node.port
    finally:
        ns.stop()
        node.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(nats-server port, mq9 port) with the same users and max_subscriptions."""
    doc = users_doc()
    base = tmp_path_factory.mktemp("security-diff")
    users = base / "users.json"
    users.write_text(json.dumps(doc))
    node = Node(base / "mq9", auth_file=str(users), max_subscriptions=MAX_SUBS, gateways=1, shards=1,
                auth_timeout=0.5)
    ns = natsraw.NatsServer(opts={"extra": f"max_subscriptions: {MAX_SUBS}\n"
                                           f"authorization: {json.dumps(dict(doc, timeout=0.5))}\n"})
    with side_by_side(node, ns) as ports:
        yield ports


def login(port: int, user: str, password: str, **opts) -> RawConn:
    c = RawConn(port)
    c.handshake(user=user, **{"pass": password}, **opts)
    return c


def both(servers, run):
    """``run(port)`` against nats-server and mq9; returns nats-server's outcome after
    asserting mq9's is the same."""
    ref, got = run(servers[0]), run(servers[1])
    assert got == ref, f"mq9 differs from nats-server:\n  mq9:         {got!r}\n  nats-server: {ref!r}"
    return ref


def err(text: str) -> bytes:
    return b"-ERR '" + text.encode() + b"'\r\n"


def pub_denied(subject: str) -> bytes:
    return err(f'Permissions Violation for Publish to "{subject}"')


def sub_denied(subject: str, queue: str | None = None) -> bytes:
    q = f' using queue "{queue}"' if queue else ""
    return err(f'Permissions Violation for Subscription to "{subject}"{q}')


OK = b"+OK\r\n"
PONG = b"PONG\r\n"
MAX = err("maximum subscriptions exceeded")

# (id, user, CONNECT options, bytes sent, what nats-server answers up to the PONG)
CASES = [
    ("verbose_pub_sub_denied_no_ok", "a", {"verbose": True},
     b"PUB ok.no 1\r\nx\r\nPUB ok.yes 1\r\nx\r\nPUB nope 0\r\n\r\nSUB ok.secret 1\r\nSUB ok.> 2\r\n"
     b"SUB ok.q.a grp 3\r\nSUB ok.q.a other 4\r\nSUB nope 5\r\nSUB _INBOX.x 6\r\nSUB ok.y 7\r\n",
     pub_denied("ok.no") + OK + pub_denied("nope") + sub_denied("ok.secret") + OK
     + sub_denied("ok.q.a", "grp") + OK + sub_denied("nope") + OK + MAX + PONG),
    # Pedantic: the invalid-subject complaint first, then the permission check.
    ("pedantic_then_permission", "a", {"pedantic": True},
     b"PUB ok.* 0\r\n\r\nPUB nope.* 0\r\n\r\n",
     err("Invalid Publish Subject") + err("Invalid Publish Subject") + pub_denied("nope.*") + PONG),
    # Permissions are checked before a reused sid is ignored.
    ("permission_before_reused_sid", "a", {},
     b"SUB ok.* 1\r\nSUB ok.* 1\r\nSUB nope.* 1\r\nSUB ok 9\r\n",
     sub_denied("nope.*") + sub_denied("ok") + PONG),
    # Subscription subjects match allow patterns token by token, wildcards taken literally;
    # an empty token matches nothing; a subject the patterns allow may still be invalid.
    ("wildcard_subjects_against_allow", "a", {"verbose": True},
     b"SUB a..b 1\r\nSUB ok..b 2\r\nSUB > 3\r\nSUB *.x 4\r\nSUB ok.* 5\r\nSUB ok.>.x 6\r\n",
     sub_denied("a..b") + sub_denied("ok..b") + sub_denied(">") + sub_denied("*.x") + OK
     + err("Invalid Subject") + PONG),
    # Order: permissions, then the limit (even for a reused sid), then the subject.
    ("max_subscriptions_order", "a", {"verbose": True},
     b"SUB ok.a 1\r\nSUB ok.b 2\r\nSUB ok.c 3\r\nSUB ok.d 1\r\nSUB ok.e 4\r\nSUB nope 1\r\n"
     b"SUB a..b 5\r\nUNSUB 1\r\nSUB ok.f 5\r\n",
     OK * 3 + MAX + MAX + sub_denied("nope") + sub_denied("a..b") + OK + OK + PONG),
    ("max_subscriptions_before_invalid_subject", "free", {"verbose": True},
     b"SUB a 1\r\nSUB b 2\r\nSUB c..d 3\r\nSUB c 3\r\nSUB d 4\r\nSUB e..f 5\r\n",
     OK + OK + err("Invalid Subject") + OK + MAX + MAX + PONG),
    # A deny list alone: a wildcard covering denied subjects is allowed, one inside is not.
    ("deny_only", "n", {},
     b"SUB > 1\r\nSUB x.* 2\r\nSUB x 3\r\nSUB x.> 4\r\nPUB anything 0\r\n\r\n",
     sub_denied("x.*") + sub_denied("x.>") + b"MSG anything 1 0\r\n\r\n" + PONG),
    # Queue-group entries: "jobs.* workers" allows only that group on jobs.*.
    ("queue_entries", "q", {"verbose": True},
     b"SUB jobs.a workers 1\r\nSUB jobs.a others 2\r\nSUB jobs.a 3\r\nSUB ev.x any 4\r\nSUB ev.y 5\r\n"
     b"PUB jobs.a 0\r\n\r\nPUB jobs.a.b 0\r\n\r\n",
     OK + sub_denied("jobs.a", "others") + sub_denied("jobs.a") + OK + OK + OK
     + b"MSG jobs.a 1 0\r\n\r\n" + pub_denied("jobs.a.b") + PONG),
    # allow_responses without a publish allow-list entry for the subject: denied until a
    # message with that reply subject was delivered.
    ("responses_only_after_delivery", "r", {},
     b"PUB elsewhere 0\r\n\r\nSUB svc.a 1\r\nPUB svc.a rep.1 1\r\nx\r\n",
     pub_denied("elsewhere") + b"MSG svc.a 1 rep.1 1\r\nx\r\n" + PONG),
    ("bcrypt_user", "h", {}, b"PUB h.x 0\r\n\r\nPUB g 0\r\n\r\n", pub_denied("g") + PONG),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_permission_exchanges(servers, case):
    _, user, opts, data, expected = case
    password = {"a": "b", "h": "hashed"}.get(user, user)

    def run(port):
        with login(port, user, password, **opts) as c:
            out = c.exchange(data)
            return out, c.check_closed(30)

    got = both(servers, run)
    assert got == (expected, False)


def test_bad_credentials(servers):
    def run(port):
        out = []
        for connect in ({"user": "a", "pass": "x"}, {"user": "nobody", "pass": "b"},
                        {"user": "h", "pass": "wrong"}, {}, {"auth_token": "b"}):
            with RawConn(port) as c:
                c.send(natsraw.connect_line(**connect) + b"PING\r\n")
                out.append((c.read_until_closed(3), c.closed))
        return out

    got = both(servers, run)
    assert got == [(err("Authorization Violation"), True)] * 5


def test_deny_filters_deliveries_and_responses_expire(servers):
    """A wildcard subscription that covers denied subjects gets no message on them; a
    reply subject may be answered once (allow_responses max 1)."""
    def run(port):
        seen = []
        with login(port, "n", "n") as n, login(port, "r", "r") as r, \
                login(port, "a", "b") as a, login(port, "free", "free") as f:
            n.exchange(b"SUB > 1\r\nSUB y.> 4\r\nSUB x 3\r\n")
            a.exchange(b"SUB ok.rep 1\r\nSUB _INBOX.z 2\r\nSUB ok.* 3\r\n")
            r.exchange(b"SUB svc.a 1\r\n")
            f.exchange(b"PUB x.a 1\r\nx\r\nPUB y.a 1\r\ny\r\nPUB x 1\r\nz\r\n"
                       b"PUB svc.a ok.rep 2\r\nhi\r\nPUB svc.a _INBOX.z 2\r\nhi\r\nPUB ok.secret 1\r\ns\r\n")
            seen.append(n.exchange(b""))
            seen.append(r.exchange(b""))
            seen.append(r.exchange(b"PUB ok.rep 3\r\nres\r\nPUB ok.rep 3\r\nres\r\nPUB _INBOX.z 1\r\nx\r\n"))
            seen.append(a.exchange(b""))
        return seen

    got = both(servers, run)
    assert got == [
        # "x.a" (denied) is not delivered to "SUB >"; everything else is
        b"MSG y.a 1 1\r\ny\r\nMSG y.a 4 1\r\ny\r\nMSG x 1 1\r\nz\r\nMSG x 3 1\r\nz\r\n"
        b"MSG svc.a 1 ok.rep 2\r\nhi\r\nMSG svc.a 1 _INBOX.z 2\r\nhi\r\nMSG ok.secret 1 1\r\ns\r\n" + PONG,
        b"MSG svc.a 1 ok.rep 2\r\nhi\r\nMSG svc.a 1 _INBOX.z 2\r\nhi\r\n" + PONG,
        pub_denied("ok.rep") + PONG,
        b"MSG ok.rep 1 3\r\nres\r\nMSG ok.rep 3 3\r\nres\r\nMSG _INBOX.z 2 1\r\nx\r\n" + PONG,
    ]


# ---- TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory):
    """(nats-server port, mq9 port), both requiring TLS with client certificates."""
    import certs

    base = tmp_path_factory.mktemp("tls-diff")
    ca = certs.CA(base)
    srv = ca.issue("server", server=True)
    node = Node(base / "mq9", tls_cert=srv.cert, tls_key=srv.key, tls_ca=ca.pem, tls_verify=True,
                tls_timeout=0.5, gateways=1, shards=1)
    ns = natsraw.NatsServer(opts={"extra": "tls {\n" + f"  cert_file: {json.dumps(srv.cert)}\n"
                                           f"  key_file: {json.dumps(srv.key)}\n"
                                           f"  ca_file: {json.dumps(ca.pem)}\n"
                                           "  verify: true\n  timeout: 0.5\n}\n"})
    with side_by_side(node, ns) as ports:
        yield ports


def test_tls_plain_client_is_dropped_silently(tls_servers):
    """INFO (in clear, tls_required and tls_verify set), then plain protocol instead of a
    ClientHello: nats-server closes without a word (no -ERR, no TLS alert); a client that
    sends nothing is closed when the TLS timeout runs out."""
    def run(port):
        out = []
        with RawConn(port) as c:
            info = (c.info.get("tls_required"), c.info.get("tls_verify"))
            c.send(natsraw.connect_line() + b"PING\r\n")
            out.append((info, c.read_until_closed(3), c.closed))
        with RawConn(port) as c:
            t0 = time.monotonic()
            data = c.read_until_closed(3)
            out.append((data, c.closed, 0.3 < time.monotonic() - t0 < 2.0))
        return out

    got = both(tls_servers, run)
    assert got == [((True, True), b"", True), (b"", True, True)]


def test_bcrypt_login_with_pipelined_ops(servers):
    """The bcrypt check runs off the event loop; what the client sent after CONNECT waits
    for it and is then processed in order, as nats-server does."""
    def run(port):
        out = []
        for pw in ("hashed", "wrong"):
            with RawConn(port) as c:
                c.send(natsraw.connect_line(user="h", verbose=True, **{"pass": pw})
                       + b"SUB h.x 1\r\nPUB h.x 2\r\nhi\r\nPUB g 0\r\n\r\nPING\r\n")
                out.append((c.read_until(b"PONG\r\n", 3), c.check_closed(50)))
        return out

    got = both(servers, run)
    assert got == [(OK + OK + OK + b"MSG h.x 1 2\r\nhi\r\n" + pub_denied("g") + PONG, False),
                   (err("Authorization Violation"), True)]
