"""Config reload on a real node (SIGHUP, ``mq9 node --signal reload``): users added and
removed, TLS certificates replaced, a broken auth file refused, the log level changed;
``--log-format json``; ``--signal`` names and errors."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import nats
import pytest
from agents import T

import certs
from nodeproc import child_env

GATEWAYS, SHARDS = 2, 2


def wait_for(check, what: str, node, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{node.log_tail()}")
        time.sleep(0.05)


def reloaded_everywhere(node, generation: int) -> None:
    """Every gateway and shard logged that it applied reload ``generation``."""
    line = f"event=config_reloaded generation={generation}"
    wait_for(lambda: node.log_text().count(line) >= GATEWAYS + SHARDS,
             f"{line} from {GATEWAYS + SHARDS} children", node)


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
        # connections made before the reload keep their session
        assert await round_trip(alice) == b"still here"
        assert await round_trip(bob) == b"still here"

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
