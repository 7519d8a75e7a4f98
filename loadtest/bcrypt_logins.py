"""What many clients logging in at once as one bcrypt user cost (``mq9/gateway/bcryptchecks.py``).

    python -m loadtest.bcrypt_logins [--conns 2000,5000] [--cost 10] [--gateways 1]

Per count: one node (``--gateways``, 1 shard) on 127.0.0.1 with the default 2 s auth timeout
and one auth-file user whose password is a bcrypt hash of cost ``--cost``. ``--conns``
sockets are opened one after the other, each sending ``CONNECT`` (right password) and
``PING`` as soon as it is open, as clients do when a fleet reconnects. Printed: the time
from the first socket to the last answer, how many got ``PONG`` (logged in), how many
``-ERR 'Authentication Timeout'`` and anything else, the slowest login (CONNECT sent to
PONG), the slowest PING/PONG of a probe connection of another user meanwhile (how long the
gateway's loop was held; with several gateways, the probe's one), and
``mq9_bcrypt_checks_total`` from /metrics (absent before that metric existed).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from natsraw import RawConn, connect_line  # noqa: E402
from nodeproc import Node  # noqa: E402

TIMEOUT = b"-ERR 'Authentication Timeout'"
PROBE = {"user": "probe", "password": "p"}


def _bcrypt(pw: str, cost: int) -> str:
    import bcrypt

    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()


def run(conns: int, cost: int, gateways: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mq9-logins-") as base:
        users = os.path.join(base, "users.json")
        with open(users, "w") as f:
            json.dump({"users": [{"user": "u", "password": _bcrypt("p", cost) if cost else "p"},
                                 PROBE]}, f)
        node = Node(base, auth_file=users, gateways=gateways, shards=1).start()
        sel = selectors.DefaultSelector()
        socks = []
        got: dict[socket.socket, bytes] = {}
        sent_at: dict[socket.socket, float] = {}
        done_at: dict[socket.socket, float] = {}
        hello = connect_line(user="u", **{"pass": "p"}) + b"PING\r\n"
        probe = RawConn(node.port)
        probe.handshake(user="probe", **{"pass": "p"})
        probe.sock.setblocking(False)
        sel.register(probe.sock, selectors.EVENT_READ)
        pinged = [0.0, 0.0]  # when the probe's PING went out, the slowest PONG
        try:
            def ping() -> None:
                probe.sock.sendall(b"PING\r\n")
                pinged[0] = time.monotonic()

            def answers(wait: float) -> None:
                for key, _ in sel.select(wait):
                    s = key.fileobj
                    if s is probe.sock:
                        if b"PONG" in s.recv(65536):
                            pinged[1] = max(pinged[1], time.monotonic() - pinged[0])
                            ping()
                        continue
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    got[s] += data
                    if not data or b"PONG\r\n" in got[s] or b"-ERR" in got[s]:
                        done_at[s] = time.monotonic()
                        sel.unregister(s)

            start = time.monotonic()
            ping()
            for i in range(conns):
                s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
                s.sendall(hello)
                sent_at[s] = time.monotonic()
                s.setblocking(False)
                socks.append(s)
                got[s] = b""
                sel.register(s, selectors.EVENT_READ)
                if i % 20 == 19:  # read what came meanwhile: a login's time is its own
                    answers(0)
            opened = time.monotonic() - start
            deadline = time.monotonic() + 600
            while len(done_at) < conns and time.monotonic() < deadline:
                answers(1.0)
            took = max(done_at.values(), default=start) - start
            ok = [s for s in socks if b"PONG\r\n" in got[s]]
            timeouts = sum(TIMEOUT in got[s] for s in socks)
            other = conns - len(ok) - timeouts
            slowest = max((done_at[s] - sent_at[s] for s in ok), default=0.0)
            checks = node.metric("mq9_bcrypt_checks_total")
            print(f"conns={conns} cost={cost} gateways={gateways} opened_in={opened:.2f}s "
                  f"all_answered_in={took:.2f}s logged_in={len(ok)} auth_timeout={timeouts} "
                  f"other={other} slowest_login={slowest:.2f}s slowest_probe_pong={pinged[1] * 1000:.0f}ms "
                  f"bcrypt_checks={'n/a' if checks is None else int(checks)}")
        finally:
            for s in socks:
                s.close()
            probe.close()
            sel.close()
            node.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", default="2000,5000", help="comma-separated counts, one node each")
    ap.add_argument("--cost", type=int, default=10,
                    help="bcrypt cost of the user's password (0: a plain-text password, for reference)")
    ap.add_argument("--gateways", type=int, default=1)
    args = ap.parse_args()
    for n in args.conns.split(","):
        run(int(n), args.cost, args.gateways)


if __name__ == "__main__":
    main()
