"""Config reload on a real node (SIGHUP, ``mq9 node --signal reload``): users added and
removed, TLS certificates replaced, a broken auth file refused, the log level changed;
connections checked again after a reload that changed authorization, byte for byte against
nats-server reloaded the same way; ``--log-format json``; ``--signal`` names and errors."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import certs
import nats
import natsraw
import pytest
from agents import T
from natsraw import RawConn
from nodeproc import Node, child_env

GATEWAYS, SHARDS = 2, 2


def wait_for(check, what: str, node, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{node.log_tail()}")
        time.sleep(0.05)


async def until(check, what: str, node, timeout: float = 20.0) -> None:
    """``wait_for`` in a coroutine: nats-py's connections go on meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{node.log_tail()}")
        await asyncio.sleep(0.05)


def reloaded_everywhere(node, generation: int) -> None:
    """Every gateway and shard logged that it applied reload ``generation``."""
    reloaded_everywhere_of(node, generation, GATEWAYS + SHARDS)


def reloaded_everywhere_of(node, generation: int, children: int) -> None:
    line = f"event=config_reloaded generation={generation}"
    wait_for(lambda: node.log_text().count(line) >= children, f"{line} from {children} children", node)


def mq9(*args, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mq9", *args], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout)


def users_file(path, *users) -> str:
    path.write_text("".join(f'[[users]]\nuser = "{u}"\npassword = "{u}-pw"\n' for u in users))
    return str(path)


async def connect(node, user: str, **kw):
    return await nats.connect(node.url, user=user, password=f"{user}-pw", connect_timeout=T,
                              allow_reconnect=False, **kw)


async def refused(node, user: str) -> bool:
    try:
        nc = await connect(node, user)
    except Exception as e:  # noqa: BLE001 - nats-py raises several kinds for a refusal
        return "authorization" in str(e).lower() or isinstance(e, nats.errors.Error)
    await nc.close()
    return False


async def round_trip(nc) -> bytes:
    sub = await nc.subscribe("reload.check")
    await nc.flush(T)
    await nc.publish("reload.check", b"still here")
    msg = await sub.next_msg(T)
    await sub.unsubscribe()
    return msg.data


async def test_auth_file_reload_adds_and_removes_users_and_refuses_a_broken_file(node_factory, tmp_path):
    auth = users_file(tmp_path / "users.toml", "alice", "bob")
    node = node_factory(auth_file=auth)
    children = node.pids()
    alice = await connect(node, "alice")
    bob = await connect(node, "bob")
    try:
        assert await refused(node, "carol")
        users_file(tmp_path / "users.toml", "alice", "carol")
        r = mq9("node", "--signal", "reload", "--data-dir", node.data_dir)
        assert r.returncode == 0, r.stderr
        assert f"sent SIGHUP to {node.pid}" in r.stderr
        reloaded_everywhere(node, 1)

        carol = await connect(node, "carol")  # added: may connect now
        await carol.close()
        assert await refused(node, "bob")     # removed: may not
        # bob's connection is closed (see test_reload_rechecks_connections_as_nats_server_does);
        # alice, whom the reload left as she was, keeps her session
        await until(lambda: bob.is_closed, "bob's connection closed", node)
        assert await round_trip(alice) == b"still here"

        # A broken file: the supervisor says why in one line; everything goes on as it was.
        (tmp_path / "users.toml").write_text('[[users]]\nuser = "dave"\n password = \n')
        node.signal(signal.SIGHUP)
        wait_for(lambda: "event=reload_failed" in node.log_text(), "reload_failed", node)
        line = next(ln for ln in node.log_text().splitlines() if "event=reload_failed" in ln)
        assert "proc=supervisor" in line and "users.toml" in line and "hint=" in line, line
        assert "Traceback" not in node.log_text()
        carol = await connect(node, "carol")
        await carol.close()
        assert await refused(node, "dave")
        assert await round_trip(alice) == b"still here"
        assert node.pids() == children and node.running
        assert "event=child_died" not in node.log_text()
    finally:
        await alice.close()
        await bob.close()


# ---- connections checked again after a reload, against nats-server ------------------------

def bcrypt_hash(pw: str) -> str:
    import bcrypt

    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4, prefix=b"2a")).decode()  # cost 4: fast


class Pair:
    """nats-server and an mq9 node with the same authorization, reloaded the same way:
    ``auth`` is what nats-server's ``authorization`` block holds (mq9 gets it as its
    --auth-file when it has ``users``, else as the --config file's settings)."""

    def __init__(self, base, auth: dict, **flags):
        self.base = base
        self.users = "users" in auth
        self.auth_path = base / ("users.json" if self.users else "mq9.toml")
        self._write_mq9(auth)
        where = {"auth_file": str(self.auth_path)} if self.users else {"config": str(self.auth_path)}
        self.node = Node(base / "mq9", shards=1, **where, **flags)
        self.ns = natsraw.NatsServer(opts={"extra": self._ns_text(auth)})
        self.node.start(wait=False)
        self.ns.start()
        self.node.wait_ready()
        self.ports = {"nats-server": self.ns.port, "mq9": self.node.port}
        self.generation = 0

    @staticmethod
    def _ns_text(auth: dict) -> str:
        return f"authorization: {json.dumps(auth)}\n"

    def _write_mq9(self, auth: dict) -> None:
        if self.users:
            self.auth_path.write_text(json.dumps(auth))
        else:  # token / single user: the config file's keys, which a reload re-reads
            keys = {"token": "auth_token", "user": "user", "password": "password"}
            self.auth_path.write_text("".join(f"{keys[k]} = {json.dumps(v)}\n" for k, v in auth.items()))

    def reload(self, auth: dict) -> None:
        """Both servers re-read ``auth``; returns once both have checked their connections."""
        self.generation += 1
        self._write_mq9(auth)
        self.ns.opts["extra"] = self._ns_text(auth)
        conf = f"{self.ns.workdir}/server.conf"
        with open(conf, "w") as f:
            f.write(self.ns.config_text())
        self.node.signal(signal.SIGHUP)
        self.ns.proc.send_signal(signal.SIGHUP)
        gateways = int(self.node.flags["gateways"])
        line = f"event=auth_rechecked generation={self.generation} "
        wait_for(lambda: self.node.log_text().count(line) >= gateways, line, self.node)
        ns_log = f"{self.ns.workdir}/server.log"
        wait_for(lambda: open(ns_log).read().count("Reloaded server configuration") >= self.generation,
                 "nats-server's reload", self.node)

    def rechecked(self) -> list[dict]:
        """Each gateway's auth_rechecked counts for the last reload."""
        out = []
        for ln in self.node.log_text().splitlines():
            if f"event=auth_rechecked generation={self.generation} " in ln:
                out.append({k: int(v) for k, v in (f.split("=", 1) for f in ln.split())
                            if k in ("clients", "closed_user_removed", "closed_auth_violation",
                                     "subscriptions_removed", "bcrypt_checks")})
        return out

    def close(self) -> None:
        self.ns.stop()
        self.node.close()


def login(port: int, **creds) -> RawConn:
    c = RawConn(port)
    c.handshake(**creds)
    return c


def after_reload(conn: RawConn) -> tuple[list[bytes], bool]:
    """What a connection was sent once the reload was done (its lines, sorted: nats-server
    removes subscriptions in its map's order), and whether the server closed it."""
    data = conn.read_quiet(200)
    closed = conn.check_closed(100)
    data += conn._take()
    return frames(data), closed


def frames(data: bytes) -> list[bytes]:
    """Sorted protocol messages, without the PINGs nats-server sends a new client early."""
    return sorted(f for f in natsraw.split_frames(data) if f != b"PING\r\n")


def same_on_both(outcomes: dict) -> object:
    ref, got = outcomes["nats-server"], outcomes["mq9"]
    assert got == ref, f"mq9 differs from nats-server:\n  mq9:         {got!r}\n  nats-server: {ref!r}"
    return ref


H_OLD, H_SAME = bcrypt_hash("old"), bcrypt_hash("same")
BEFORE = {"users": [
    {"user": "keep", "password": "keep"},
    {"user": "gone", "password": "gone"},
    {"user": "pw", "password": "old"},
    {"user": "hashed", "password": H_OLD},
    {"user": "rehashed", "password": H_SAME},
    {"user": "narrow", "password": "narrow",
     "permissions": {"subscribe": {"allow": ["x.>", "y.>", "q.* g1", "q.* g2"]},
                     "publish": ["x.>", "p.>"]}},
]}
AFTER = {"users": [
    {"user": "keep", "password": "keep"},                    # as it was
    {"user": "pw", "password": "new"},                       # password changed
    {"user": "hashed", "password": bcrypt_hash("new")},      # bcrypt password changed
    {"user": "rehashed", "password": bcrypt_hash("same")},   # same password, hashed again
    {"user": "narrow", "password": "narrow",                 # fewer subjects and queues
     "permissions": {"subscribe": {"allow": ["x.>", "q.* g1"], "deny": ["x.secret"]},
                     "publish": ["x.>"]}},
]}
LOGINS = {"keep": "keep", "gone": "gone", "pw": "old", "hashed": "old", "rehashed": "same",
          "narrow": "narrow"}
EXTRA = 6  # more logins of each bcrypt user on mq9: one bcrypt check serves them all


def test_reload_rechecks_connections_as_nats_server_does(tmp_path):
    pair = Pair(tmp_path, BEFORE, gateways=GATEWAYS)
    conns = {}
    try:
        for server, port in pair.ports.items():
            conns[server] = {u: login(port, user=u, **{"pass": pw}) for u, pw in LOGINS.items()}
        subs = {"keep": b"SUB x.1 1\r\nSUB t 2\r\n",
                "narrow": b"SUB x.1 1\r\nSUB y.1 2\r\nSUB x.* 3\r\nSUB q.a g2 4\r\n"
                          b"SUB q.a g1 5\r\nSUB x.secret 6\r\nSUB y.> 7\r\n"}
        for user, ops in subs.items():
            same_on_both({s: conns[s][user].exchange(ops) for s in conns})
        extra = [login(pair.node.port, user=u, **{"pass": LOGINS[u]})
                 for u in ("hashed", "rehashed") for _ in range(EXTRA)]

        pair.reload(AFTER)

        outcome = {s: {u: after_reload(c) for u, c in conns[s].items()} for s in conns}
        ref = same_on_both(outcome)
        violation = [b"-ERR 'Authorization Violation'\r\n"]
        removed = [b"-ERR 'Permissions Violation for Subscription to \"%s\"%s (sid \"%s\")'\r\n"
                   % (subj, b' using queue "%s"' % q if q else b"", sid)
                   for subj, q, sid in ((b"y.1", None, b"2"), (b"q.a", b"g2", b"4"),
                                        (b"x.secret", None, b"6"), (b"y.>", None, b"7"))]
        assert ref == {"keep": ([], False), "gone": ([], True), "pw": (violation, True),
                       "hashed": (violation, True), "rehashed": ([], False),
                       "narrow": (sorted(removed), False)}, ref

        # mq9: every extra connection of a user fared as that user's first; the bcrypt
        # checks were one per (user, password) per gateway, not one per connection
        assert [after_reload(c) for c in extra] == [(violation, True)] * EXTRA + [([], False)] * EXTRA
        counts = pair.rechecked()
        assert len(counts) == GATEWAYS, counts
        total = {k: sum(c[k] for c in counts) for k in counts[0]}
        assert total == {"clients": 6 + 2 * EXTRA, "closed_user_removed": 1,
                         "closed_auth_violation": 2 + EXTRA, "subscriptions_removed": 4,
                         "bcrypt_checks": total["bcrypt_checks"]}, counts
        assert 2 <= total["bcrypt_checks"] <= 2 * GATEWAYS, counts

        # what stays works, with the new permissions: narrow gets x.1 on sids 1 and 3, the
        # queue group it kept, nothing on the subjects it lost, and may no longer publish p.1
        def traffic(server):
            keep, narrow = conns[server]["keep"], conns[server]["narrow"]
            sent = keep.exchange(b"PUB x.1 1\r\na\r\nPUB y.1 1\r\nb\r\nPUB q.a 1\r\nc\r\n"
                                 b"PUB x.secret 1\r\nd\r\n")
            return frames(sent), frames(narrow.exchange(b"SUB y.2 8\r\nPUB p.1 1\r\nz\r\n"))

        ref = same_on_both({s: traffic(s) for s in conns})
        assert ref[0] == [b"MSG x.1 1 1\r\na\r\n", b"PONG\r\n"], ref
        assert ref[1] == sorted([b"MSG x.1 1 1\r\na\r\n", b"MSG x.1 3 1\r\na\r\n",
                                 b"MSG q.a 5 1\r\nc\r\n", b"PONG\r\n",
                                 b"-ERR 'Permissions Violation for Subscription to \"y.2\"'\r\n",
                                 b"-ERR 'Permissions Violation for Publish to \"p.1\"'\r\n"]), ref
    finally:
        for c in [c for s in conns.values() for c in s.values()] + locals().get("extra", []):
            c.close()
        pair.close()


@pytest.mark.parametrize("before,after,creds,closing", [
    ({"token": "t1"}, {"token": "t2"}, {"auth_token": "t1"}, [b"-ERR 'Authorization Violation'\r\n"]),
    ({"user": "u", "password": "p"}, {"user": "u", "password": "p2"}, {"user": "u", "pass": "p"}, []),
    ({"user": "u", "password": "p"}, {"token": "t"}, {"user": "u", "pass": "p"}, []),
], ids=["token_changed", "single_user_password_changed", "user_pass_to_token"])
def test_token_and_single_user_from_the_config_file(tmp_path, before, after, creds, closing):
    """--auth-token and --user/--pass, set in the --config file, change by reload too, and
    the connections that logged in with the old ones are closed as nats-server closes them."""
    pair = Pair(tmp_path, before, gateways=1)
    conns = {}
    try:
        conns = {s: login(port, **creds) for s, port in pair.ports.items()}
        same_on_both({s: c.exchange(b"SUB a 1\r\n") for s, c in conns.items()})
        pair.reload(after)
        assert same_on_both({s: after_reload(c) for s, c in conns.items()}) == (closing, True)
        new = {"auth_token": after["token"]} if "token" in after else {"user": "u", "pass": after["password"]}
        assert same_on_both({s: login(port, **new).exchange(b"") for s, port in pair.ports.items()}) == b"PONG\r\n"
    finally:
        for c in conns.values():
            c.close()
        pair.close()


def test_a_login_checked_while_a_reload_removes_its_user_is_refused(node_factory, tmp_path):
    """A bcrypt check still running when a reload comes is not trusted: the new settings
    decide (here: the user is gone, so the login gets Authorization Violation)."""
    import bcrypt

    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(15)).decode()  # ~2 s to check, far longer than a reload
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"users": [{"user": "slow", "password": slow},
                                           {"user": "alice", "password": "alice-pw"}]}))
    node = node_factory(auth_file=str(users), gateways=1, shards=1, auth_timeout=60)
    conn = RawConn(node.port)
    try:
        conn.send(natsraw.connect_line(user="slow", **{"pass": "pw"}) + b"PING\r\n")
        users.write_text(json.dumps({"users": [{"user": "alice", "password": "alice-pw"}]}))
        node.signal(signal.SIGHUP)
        reloaded_everywhere_of(node, 1, children=2)
        assert conn.read_until_closed(30) == b"-ERR 'Authorization Violation'\r\n"
        assert conn.closed
    finally:
        conn.close()


async def test_unaffected_users_keep_receiving_through_a_reload(node_factory, tmp_path):
    """A stream between connections of a user the reload leaves as it was loses nothing,
    while another user's connections are closed."""
    auth = users_file(tmp_path / "users.toml", "alice", "bob")
    node = node_factory(auth_file=auth)
    pub, sub, bob = await connect(node, "alice"), await connect(node, "alice"), await connect(node, "bob")
    got = []
    try:
        warm = asyncio.Event()

        async def take(m) -> None:
            if m.data == b"warm":
                warm.set()
            else:
                got.append(int(m.data))

        await sub.subscribe("stream", cb=take)
        await sub.flush(T)
        # Right after start the gateways' mesh may still be connecting (their PONG then
        # waits 250 ms at most): the stream starts once a message went through.
        for _ in range(100):
            await pub.publish("stream", b"warm")
            try:
                await asyncio.wait_for(warm.wait(), 0.2)
                break
            except TimeoutError:
                pass
        assert warm.is_set()
        sent = 0

        async def publish(seconds: float) -> None:
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await pub.publish("stream", str(sent).encode())
                sent += 1
                await asyncio.sleep(0.005)

        await publish(0.3)
        users_file(tmp_path / "users.toml", "alice", "carol")
        node.signal(signal.SIGHUP)
        line = "event=auth_rechecked generation=1 "
        while node.log_text().count(line) < GATEWAYS:
            await publish(0.1)
        await publish(0.3)
        await pub.flush(T)
        await until(lambda: len(got) >= sent, f"every message ({len(got)} of {sent})", node)
        assert got == list(range(sent)) and sent > 20
        assert bob.is_closed and not pub.is_closed and not sub.is_closed
    finally:
        for nc in (pub, sub, bob):
            await nc.close()


def served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection is shown (after the clear-text INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=T) as s:
        info = s.recv(4096)
        assert info.startswith(b"INFO ") and b'"tls_required":true' in info, info
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return t.getpeercert(binary_form=True)


def pem_der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def test_tls_certificates_and_log_level_from_the_config_file(node_factory, tmp_path):
    first = certs.CA(tmp_path / "ca1").issue("server", server=True)
    second = certs.CA(tmp_path / "ca2", name="second CA").issue("server", server=True)
    conf = tmp_path / "mq9.toml"

    def write_conf(level: str, max_msgs: int) -> None:
        conf.write_text(f'tls_cert = "{tmp_path}/live.pem"\ntls_key = "{tmp_path}/live.key"\n'
                        f'log_level = "{level}"\nmax_msgs = {max_msgs}\n')

    (tmp_path / "live.pem").write_bytes(open(first.cert, "rb").read())
    (tmp_path / "live.key").write_bytes(open(first.key, "rb").read())
    write_conf("info", 100)
    node = node_factory(config=str(conf))
    children = node.pids()
    assert served_certificate(node.port) == pem_der(first.cert)
    # At info, a plain-text client on the TLS port leaves no line (it is a debug event).
    with socket.create_connection(("127.0.0.1", node.port), timeout=T) as s:
        s.recv(4096)
        s.sendall(b"CONNECT {}\r\nPING\r\n")
        assert s.recv(4096) == b""
    time.sleep(0.3)
    assert "event=tls_handshake_failed" not in node.log_text()

    (tmp_path / "live.pem").write_bytes(open(second.cert, "rb").read())
    (tmp_path / "live.key").write_bytes(open(second.key, "rb").read())
    write_conf("debug", 5)
    node.signal(signal.SIGHUP)
    reloaded_everywhere(node, 1)
    assert served_certificate(node.port) == pem_der(second.cert)
    with socket.create_connection(("127.0.0.1", node.port), timeout=T) as s:
        s.recv(4096)
        s.sendall(b"CONNECT {}\r\nPING\r\n")
        assert s.recv(4096) == b""
    wait_for(lambda: "event=tls_handshake_failed" in node.log_text(), "a gateway's debug line", node)
    text = node.log_text()
    # what a reload cannot change is said once, and the node keeps running with the old value
    assert "event=reload_needs_restart settings=max_msgs" in text
    assert "event=reload_done generation=1 changed=log_level children=4" in text
    assert node.pids() == children


def test_json_log_format_every_line_parses(node_factory, tmp_path):
    node = node_factory(log_format="json")
    node.signal(signal.SIGHUP)
    node.signal(signal.SIGUSR1)

    def events() -> list[dict]:
        return [json.loads(ln) for ln in node.log_text().splitlines() if not ln.startswith("--- ")]

    wait_for(lambda: sum(d["event"] == "config_reloaded" for d in events()) >= GATEWAYS + SHARDS,
             "reloads", node)
    wait_for(lambda: any(d["event"] == "log_reopen_ignored" for d in events()), "SIGUSR1", node)
    assert node.stop() == 0
    docs = events()  # json.loads raises on any line that is not one JSON object
    assert all(list(d)[:4] == ["ts", "level", "proc", "event"] for d in docs), docs[:3]
    procs = {d["proc"] for d in docs}
    assert {"supervisor", "gateway-0", "gateway-1", "shard-0", "shard-1"} <= procs, procs
    assert {"node_ready", "node_stopped", "reload_done"} <= {d["event"] for d in docs}


def test_signal_names_and_errors(tmp_path):
    # A stand-in for a node: a process that reports the signals it receives.
    code = ("import signal, sys, time\n"
            "got = lambda s, f: print(signal.Signals(s).name, flush=True)\n"
            "for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGTERM):\n"
            "    signal.signal(s, got)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        (tmp_path / "node.pid").write_text(f"{p.pid}\n")
        sent = []
        for name, sig in (("ldm", "SIGUSR2"), ("reopen", "SIGUSR1"), ("reload", "SIGHUP"),
                          ("quit", "SIGINT"), ("term", "SIGTERM")):
            target = f"{p.pid}" if name != "reload" else str(tmp_path / "node.pid")
            r = mq9("node", "--signal", f"{name}={target}")
            assert r.returncode == 0, r.stderr
            assert p.stdout.readline().strip() == sig
            sent.append(sig)
        r = mq9("node", "--signal", f"stop={p.pid}")
        assert r.returncode == 0 and p.wait(T) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
    for args, error in (
            (["--signal", "hup"], "unknown signal 'hup': one of stop, quit, term, reopen, reload, ldm"),
            (["--signal", "reload", "--data-dir", str(tmp_path / "none")], "no mq9 node runs on data dir"),
            (["--signal", "reload", "--data-dir", str(tmp_path)], "no mq9 node runs on data dir"),
            (["--signal", f"reload={p.pid}"], f"no process {p.pid}"),
            (["--signal", "reload=" + str(tmp_path / "missing.pid")], "missing.pid: No such file")):
        if "--data-dir" in args and args[-1] == str(tmp_path):
            (tmp_path / "supervisor.lock").write_text(f"{p.pid}\n")  # left by a node that is gone
        r = mq9("node", *args)
        assert r.returncode == 1 and error in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_signal_finds_the_data_dir_in_the_environment_and_config_file(node_factory, tmp_path):
    conf = tmp_path / "mq9.toml"
    node = node_factory()
    conf.write_text(f'data_dir = "{node.data_dir}"\n')
    r = mq9("node", "--signal", "reopen", env={"MQ9_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    r = mq9("node", "--signal", "reload", env={"MQ9_DATA_DIR": node.data_dir})
    assert r.returncode == 0, r.stderr
    reloaded_everywhere(node, 1)
    wait_for(lambda: "event=log_reopen_ignored" in node.log_text(), "SIGUSR1 logged", node)
    assert node.running


def test_reloads_while_children_start_kill_none_of_them(node_factory):
    # A child spawned a moment ago is still importing, with no SIGHUP handler yet: the
    # supervisor spawns it with SIGHUP blocked, so a reload waits for it instead of killing it.
    node = node_factory(start=False)
    node.start(wait=False)
    wait_for(lambda: "event=node_starting" in node.log_text(), "node_starting", node)
    sent = 0
    deadline = time.monotonic() + 30
    while "event=node_ready" not in node.log_text() and time.monotonic() < deadline:
        node.signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.02)
    node.wait_ready()
    node.signal(signal.SIGHUP)
    text = node.log_text()
    assert sent > 5
    assert "event=child_died" not in text and "event=child_restarting" not in text, node.log_tail()
    assert len(node.pids("gateway")) == GATEWAYS and len(node.pids("shard")) == SHARDS
