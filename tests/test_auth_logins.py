"""Many clients logging in at once as one bcrypt user (mq9/gateway/bcryptchecks.py): one
check per (user, password) in flight per gateway, a success remembered for a while, a
refusal never, and a reload that changes the password forgets what was remembered."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import time

import pytest
from natsraw import connect_line

GATEWAYS = 2
LOGINS = 300
OK = b"PONG\r\n"
VIOLATION = b"-ERR 'Authorization Violation'\r\n"


def bcrypt_hash(pw: str) -> str:
    import bcrypt

    # cost 11 (a good part of a second under load): every login below is sent while the
    # first check still runs, so without sharing each would run one of its own
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(11)).decode()


def write_users(path, password_hash: str) -> None:
    path.write_text(json.dumps({"users": [{"user": "u", "password": password_hash}]}))


def logins(port: int, n: int, password: str, timeout: float = 90.0) -> list[bytes]:
    """n connections opened first, then CONNECT + PING sent on each at once; what each got
    back until its PONG, an -ERR or its close (INFO left out)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    try:
        # protocol 0: no INFO after the first PONG, so the answer is PONG or -ERR alone
        hello = connect_line(user="u", protocol=0, **{"pass": password}) + b"PING\r\n"
        for s in socks:
            s.sendall(hello)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        waiting = n
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                got[s] += data
                if not data or got[s].endswith(OK) or b"-ERR" in got[s]:
                    sel.unregister(s)
                    waiting -= 1
        return [got[s].split(b"\r\n", 1)[1] if got[s].startswith(b"INFO ") else got[s] for s in socks]
    finally:
        sel.close()
        for s in socks:
            s.close()


def checks(node) -> int:
    return int(node.metric("mq9_bcrypt_checks_total"))


@pytest.fixture
def node(node_factory, tmp_path):
    users = tmp_path / "users.json"
    write_users(users, bcrypt_hash("right"))
    # a long auth timeout: the test is about how many checks run, not how fast
    n = node_factory(auth_file=str(users), gateways=GATEWAYS, shards=1, auth_timeout=60)
    n.users = users
    return n


def test_mass_login_runs_one_bcrypt_check_per_gateway(node):
    assert checks(node) == 0
    got = logins(node.port, LOGINS, "right")
    assert got == [OK] * LOGINS, sorted(set(got))
    assert 1 <= checks(node) <= GATEWAYS


def test_wrong_password_fails_every_time(node):
    assert logins(node.port, 20, "right") == [OK] * 20  # remembered by the gateways...
    before = checks(node)
    # ...and says nothing of another password: each attempt below runs its own check
    # (none is in flight when the next is sent), and is refused
    for attempt in ("wrong", "wrong", "right-not", "Right"):
        assert logins(node.port, 1, attempt) == [VIOLATION], attempt
    assert checks(node) - before == 4
    # wrong passwords sent at once share checks, and all are refused
    assert logins(node.port, 50, "wrong") == [VIOLATION] * 50
    assert logins(node.port, 5, "right") == [OK] * 5


def test_reload_with_a_new_password_forgets_the_old_one(node):
    assert logins(node.port, 40, "right") == [OK] * 40  # remembered by both gateways, surely
    write_users(node.users, bcrypt_hash("new"))
    node.signal(signal.SIGHUP)
    line = "event=config_reloaded generation=1"
    deadline = time.monotonic() + 30
    while node.log_text().count(line) < GATEWAYS + 1:  # and the shard
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.05)
    assert logins(node.port, 20, "right") == [VIOLATION] * 20
    assert logins(node.port, 20, "new") == [OK] * 20
