"""What checking connections again after a reload costs (``mq9/gateway/reauth.py``).

    python -m loadtest.reload_recheck [--conns 5000] [--case perms,bcrypt,bcrypt-new,removed]

Per case: one node (1 gateway, 1 shard) on 127.0.0.1, ``--conns`` connections of user ``u``
with 4 subscriptions each, and a probe connection of another user; the auth file is
rewritten and the node gets SIGHUP. Printed: the time from SIGHUP to the gateway's
``auth_rechecked`` line, the slowest PING/PONG of the probe meanwhile (how long the loop was
held), and the line itself. Cases:

- ``perms``: u's subscribe permission narrowed: 2 of the 4 subscriptions removed, each;
- ``bcrypt``: u's bcrypt password hashed again (same password): one check, all stay;
- ``bcrypt-new``: u's bcrypt password changed: one check, all get Authorization Violation;
- ``removed``: u taken out of the file: all closed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from natsraw import RawConn, connect_line  # noqa: E402
from nodeproc import Node  # noqa: E402

PROBE = {"user": "probe", "password": "p"}


def _bcrypt(pw: str) -> str:
    import bcrypt

    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(10)).decode()


def _cases() -> dict:
    def u(password: str, subscribe=None) -> dict:
        d = {"user": "u", "password": password}
        if subscribe:
            d["permissions"] = {"subscribe": subscribe}
        return d

    first = _bcrypt("p")
    return {
        "perms": ([u("p", ["a.>", "b.>"]), PROBE], [u("p", ["a.>"]), PROBE]),
        "bcrypt": ([u(first), PROBE], [u(_bcrypt("p")), PROBE]),
        "bcrypt-new": ([u(first), PROBE], [u(_bcrypt("other")), PROBE]),
        "removed": ([u("p"), PROBE], [PROBE]),
    }


def _read_to(sock: socket.socket, pattern: bytes) -> bytes:
    buf = b""
    while pattern not in buf:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf


def run(case: str, before: list, after: list, conns: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mq9-recheck-") as base:
        users = os.path.join(base, "users.json")
        with open(users, "w") as f:
            json.dump({"users": before}, f)
        # a long auth timeout: thousands of bcrypt logins at once take a while
        node = Node(base, auth_file=users, gateways=1, shards=1, auth_timeout=120).start()
        socks = []
        try:
            probe = RawConn(node.port)  # select() needs a low fd: open it first
            probe.handshake(user="probe", **{"pass": "p"})
            for _ in range(conns):
                s = socket.create_connection(("127.0.0.1", node.port), timeout=60)
                _read_to(s, b"\r\n")
                s.sendall(connect_line(user="u", **{"pass": "p"})
                          + b"SUB a.1 1\r\nSUB b.1 2\r\nSUB a.2 3\r\nSUB b.2 4\r\nPING\r\n")
                socks.append(s)
            for s in socks:
                if b"PONG\r\n" not in _read_to(s, b"PONG\r\n"):
                    raise SystemExit(f"{case}: a connection was refused at login")
            with open(users, "w") as f:
                json.dump({"users": after}, f)
            line = "event=auth_rechecked generation=1 "
            worst = 0.0
            start = time.monotonic()
            node.signal(signal.SIGHUP)
            while line not in node.log_text():
                t = time.monotonic()
                probe.send(b"PING\r\n")
                if not probe.read_until(b"PONG\r\n", 30).endswith(b"PONG\r\n"):
                    raise SystemExit(f"{case}: the probe got no PONG")
                worst = max(worst, time.monotonic() - t)
            took = time.monotonic() - start
            done = next(ln for ln in node.log_text().splitlines() if line in ln)
            print(f"{case:11} conns={conns} sighup->auth_rechecked={took:.3f}s "
                  f"slowest_probe_pong={worst * 1000:.1f}ms  {done.split('event=')[1]}")
        finally:
            for s in socks:
                s.close()
            node.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--case", default="perms,bcrypt,bcrypt-new,removed")
    args = ap.parse_args()
    cases = _cases()
    for name in args.case.split(","):
        if name not in cases:
            raise SystemExit(f"unknown case {name!r}: one of {', '.join(cases)}")
        run(name, *cases[name], args.conns)


if __name__ == "__main__":
    main()
