"""A node (``mq9/node.py`` with its ``mq9/supervisor.py``) and the ``mq9`` command, run as
real processes; at the end the ``Supervisor`` class on its own.

Process tests run twice: with the real gateway and shard (``real``; skipped while
``mq9.gateway.server`` / ``mq9.shard.server`` do not import) and with small stand-ins
defined below (``standin``), which pin down the supervisor's own behaviour independently of
the gateway and shard code.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nodeproc import Node, child_env, free_port, real_node_missing  # noqa: E402

from mq9 import __version__, config  # noqa: E402

OK = '{"status":"ok"}'  # nats-server's /healthz body

# ---- stand-ins, run inside spawned children ----------------------------------------------


def _wait_for_sigterm() -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.02)


def standin_gateway(cfg, index):
    """Listens like a gateway (SO_REUSEPORT, sends INFO) until SIGTERM."""
    import threading

    from mq9 import metrics

    mode = os.environ.get("STANDIN_GATEWAY", "")
    if mode == "crash":
        raise RuntimeError("stand-in gateway crashing on purpose")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((cfg.host, cfg.port))
    s.listen()
    metrics.CONNECTIONS.set(0)

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.sendall(b'INFO {"server_id":"standin"}\r\n')
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    _wait_for_sigterm()
    s.close()


def standin_shard(cfg, index):
    """Binds its ipc endpoint like a shard, until SIGTERM."""
    import zmq

    from mq9 import endpoints, metrics

    mode = os.environ.get("STANDIN_SHARD", "")
    if mode == "crash":
        raise RuntimeError("stand-in shard crashing on purpose")
    if mode == "silent":
        _wait_for_sigterm()  # never binds: never ready
        return
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoints.shard_endpoint(cfg, index))
    metrics.MAILBOXES.set(0)
    if mode == "slow-stop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    _wait_for_sigterm()
    sock.close(linger=0)
    ctx.term()


def standin_exit(cfg, index):
    """Ends at once, as a child that dies young."""


def standin_idle(cfg, index):
    _wait_for_sigterm()


def standin_node(argv: list[str]) -> int:
    """``mq9 node`` with the stand-ins as children."""
    import argparse

    from mq9 import node

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_args(parser.parse_args(argv))
    return node.run_node(cfg, targets={"gateway": "mq9.supervisor_test:standin_gateway",
                                             "shard": "mq9.supervisor_test:standin_shard"})


STANDIN_COMMAND = [sys.executable, "-c",
                   "import sys; from mq9.supervisor_test import standin_node; "
                   "sys.exit(standin_node(sys.argv[1:]))"]

# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["standin", "real"])
def mode(request):
    if request.param == "real":
        reason = real_node_missing()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def make_node(tmp_path, mode):
    made = []

    def make(start=True, **kw):
        if mode == "standin":
            kw.setdefault("command", STANDIN_COMMAND)
        n = Node(tmp_path / f"node{len(made)}", **kw)
        made.append(n)
        return n.start() if start else n

    yield make
    for n in made:
        n.close()


def _mq9(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "mq9", *args], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout)


def _wait(cond, timeout, what, node=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                         + (node.log_tail() if node else ""))


# ---- the command ---------------------------------------------------------------------------


def test_version():
    r = _mq9("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"mq9 {__version__}"


def test_help_shows_every_flag_with_env_and_default():
    r = _mq9("node", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines anywhere
    for f in fields(config.Config):
        flag, env = config._flag(f), config._env(f)
        if f.type in (bool, "bool"):  # a switch: no value after the flag
            assert f"{flag} " in text, flag
            assert f"[env {env}=1; default off]" in text, (flag, env)
            continue
        assert re.search(rf"{re.escape(flag)} [A-Z_]+ ", text), flag
        assert f"[env {env}; default {f.default}]" in text, (flag, env)


@pytest.mark.parametrize("args,env", [
    (["--port", "abc"], {}),
    (["--port", "70000"], {}),
    (["--shards", "0"], {}),
    (["--fsync", "sometimes"], {}),
    (["--log-level", "loud"], {}),
    (["--user", "alice"], {}),
    (["--config", "/nonexistent/mq9.toml"], {}),
    (["--no-such-flag"], {}),
    ([], {"MQ9_PORT": "abc"}),
    ([], {"MQ9_FSYNC": "sometimes"}),
    ([], {"MQ9_MAX_MSGS": "-1"}),
])
def test_bad_settings_exit_2_with_one_line(args, env):
    r = _mq9("node", *args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr


def test_bad_config_file_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    r = _mq9("node", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    bad.write_text("colour = 'blue'\n")
    r = _mq9("node", "--config", str(bad))
    assert r.returncode == 2 and "colour" in r.stderr and "Traceback" not in r.stderr


# ---- a running node -------------------------------------------------------------------------


def test_starts_and_serves_metrics_and_health(make_node):
    node = make_node()
    assert len(node.pids("gateway")) == 2 and len(node.pids("shard")) == 2
    assert node._info_line(timeout=5), "the NATS port does not answer with INFO"
    body = node.metrics()
    assert "mq9_" in body, body[:2000]
    assert node.http_get("/healthz") == (200, OK)
    assert node.http_get("/readyz") == (200, OK)
    assert node.http_get("/nope")[0] == 404
    log = node.log_text()
    for event in ("event=node_starting", "event=shard_ready", "event=node_ready"):
        assert event in log, node.log_tail()
    assert re.search(r"^ts=\S+ level=info proc=supervisor event=node_ready ", log, re.M)
    assert "Traceback" not in log, node.log_tail()


def test_sigterm_stops_every_process_and_exits_0(make_node):
    node = make_node()
    children = node.pids()
    assert len(children) >= 4
    started = time.monotonic()
    assert node.stop(timeout=15) == 0, node.log_tail()
    assert time.monotonic() - started < 10, "stop took too long\n" + node.log_tail()
    assert node.wait_gone(children, timeout=2) == [], node.log_tail()
    log = node.log_text()
    # gateways are stopped before shards
    gw = max(m.start() for m in re.finditer(r"event=child_stopped child=gateway", log))
    sh = min(m.start() for m in re.finditer(r"event=child_stopped child=shard", log))
    assert gw < sh, node.log_tail()
    assert "event=node_stopped" in log


def test_sigint_stops_like_sigterm(make_node):
    node = make_node()
    children = node.pids()
    node.signal(signal.SIGINT)
    assert node.proc.wait(15) == 0, node.log_tail()
    assert node.wait_gone(children, timeout=2) == []


def test_kill_9_of_the_supervisor_takes_every_child(make_node):
    node = make_node()
    children = node.pids()
    assert len(children) >= 4
    node.kill()
    assert node.wait_gone(children, timeout=2.5) == [], node.log_tail()


@pytest.mark.parametrize("kind", ["gateway", "shard"])
def test_a_killed_child_is_restarted(make_node, kind):
    node = make_node()
    victim = node.pid_of(kind, 1)
    assert victim
    os.kill(victim, signal.SIGKILL)
    new = _wait(lambda: (p := node.pid_of(kind, 1)) and p != victim and p, 10,
                f"{kind}-1 to come back", node)
    assert new != victim
    node.wait_ready(timeout=20)
    assert node.http_get("/healthz") == (200, OK)
    log = node.log_text()
    assert re.search(rf"event=child_died child={kind}-1 pid={victim} signal=SIGKILL", log), node.log_tail()
    assert f"event=child_restarting child={kind}-1" in log
    restarts = re.search(rf'^mq9_process_restarts_total{{kind="{kind}"}} (\S+)$', node.metrics(), re.M)
    assert restarts and float(restarts.group(1)) == 1.0, node.metrics()
    # the node still stops cleanly with a restarted child
    children = node.pids()
    assert node.stop(timeout=15) == 0
    assert node.wait_gone(children, timeout=2) == []


def test_mq9_port_variable_is_honoured(make_node):
    port = free_port()
    node = make_node(port=None, env={"MQ9_PORT": str(port)})
    assert node.port == port
    assert node._info_line(timeout=5)
    assert f"port={port}" in node.log_text()


# ---- failure modes (stand-ins only: they need children that misbehave) -----------------------


@pytest.fixture
def standin_only(mode):
    if mode != "standin":
        pytest.skip("needs misbehaving stand-in children")


def test_second_node_on_the_same_data_dir_is_refused(make_node, standin_only, tmp_path):
    first = make_node()
    second = make_node(start=False, data_dir=first.data_dir)
    second.start(wait=False)
    assert second.proc.wait(15) == 1
    assert "event=data_dir_in_use" in second.log_text()
    assert first.http_get("/readyz") == (200, OK)  # and the first one did not notice


def test_nats_port_in_use_is_refused(make_node, standin_only):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        node = make_node(start=False, port=holder.getsockname()[1])
        node.start(wait=False)
        assert node.proc.wait(15) == 1
    assert "event=port_unavailable" in node.log_text()
    assert node.wait_gone(timeout=1) == []


def test_a_shard_that_cannot_start_fails_the_node(make_node, standin_only):
    node = make_node(start=False, env={"STANDIN_SHARD": "crash"})
    node.start(wait=False)
    assert node.proc.wait(15) == 1, node.log_tail()
    log = node.log_text()
    assert "event=shard_failed_to_start" in log
    assert re.search(r"level=error proc=shard-\d event=child_crashed .*crashing on purpose", log), log


def test_a_crash_looping_gateway_backs_off_and_sigterm_still_works(make_node, standin_only):
    node = make_node(start=False, env={"STANDIN_GATEWAY": "crash"})
    node.start(wait=False)
    _wait(lambda: len(re.findall(r"event=child_died child=gateway-0 ", node.log_text())) >= 3,
          15, "three deaths of gateway-0", node)
    delays = [float(d) for d in re.findall(r"event=child_died child=gateway-0 .* restart_in=(\S+)",
                                           node.log_text())]
    assert delays[:3] == sorted(delays[:3]) and delays[1] > delays[0], delays
    assert node.running
    # never ready, so the metrics port never listens: nothing says the node is up
    with pytest.raises(OSError):
        node.http_get("/healthz", timeout=2)
    started = time.monotonic()
    assert node.stop(timeout=15) == 0, node.log_tail()
    assert time.monotonic() - started < 5


def test_a_second_signal_kills_children_that_ignore_sigterm(make_node, standin_only):
    node = make_node(start=False, env={"STANDIN_SHARD": "slow-stop"})
    node.start()
    children = node.pids()
    node.signal(signal.SIGTERM)
    # the kernel merges a signal sent while the same one is still pending
    _wait(lambda: "event=node_stopping" in node.log_text(), 5, "node_stopping", node)
    node.signal(signal.SIGINT)  # skips the bounded wait
    assert node.proc.wait(10) == 0, node.log_tail()
    assert node.wait_gone(children, timeout=2) == []
    assert "event=child_killed" in node.log_text()


def test_sigterm_while_shards_start_exits_0(make_node, standin_only):
    node = make_node(start=False, env={"STANDIN_SHARD": "silent"})
    node.start(wait=False)
    _wait(lambda: node.log_text().count("event=child_started") >= 2, 15, "shards spawned", node)
    children = node.pids()
    assert node.stop(timeout=15) == 0, node.log_tail()
    assert node.wait_gone(children, timeout=2) == []


# ---- log and process helpers ---------------------------------------------------------------


def test_log_lines_are_logfmt_one_per_event():
    import io
    import logging

    from mq9 import log

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
    from mq9 import log

    with pytest.raises(ValueError):
        log.setup("loud", "x")


def test_die_with_parent_exits_at_once_when_the_parent_is_already_gone():
    code = ("from mq9 import process; process.die_with_parent(parent_pid=1); "
            "print('still here')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env(), timeout=30)
    assert r.returncode == 1 and "still here" not in r.stdout


def test_die_with_parent_keeps_a_child_whose_parent_lives():
    code = ("import os; from mq9 import process; process.die_with_parent(parent_pid=os.getppid()); "
            "process.set_name('mq9-test-name'); print(open('/proc/self/comm').read().strip())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mq9-test-name"


# ---- the Supervisor class on its own, in this process --------------------------------------


def test_supervisor_restarts_with_back_off_retires_and_stops(tmp_path):
    from mq9.supervisor import Supervisor

    wake_r, wake_w = socket.socketpair()
    deaths, restarts = [], []
    cfg = config.Config(host="127.0.0.1", data_dir=str(tmp_path), gateways=1, shards=1,
                        log_level="error")
    sup = Supervisor(cfg, {"gateway": "mq9.supervisor_test:standin_exit",
                           "shard": "mq9.supervisor_test:standin_idle"},
                     wake=wake_r, on_wake=lambda: None,
                     on_death=lambda c, pid: deaths.append(c.name),
                     before_restart=lambda c: restarts.append(c.name))
    shard, gateway = sup.children

    def turn():
        sup.restart_due()
        sup.wait(0.1)
        sup.reap()

    try:
        for c in sup.children:
            sup.spawn(c)
        assert shard.pid and gateway.pid
        deadline = time.monotonic() + 120
        while deaths.count("gateway-0") < 3 and time.monotonic() < deadline:
            turn()
        # the gateway keeps dying young: restarted each time, later each time
        assert deaths.count("gateway-0") >= 3 and restarts.count("gateway-0") >= 2
        assert gateway.failures >= 3 and gateway.restart_at is not None
        assert "shard-0" not in deaths and shard.pid is not None
        # a retired child that exits stays down
        sup.retire([shard], signal.SIGTERM, reason="test")
        while "shard-0" not in deaths and time.monotonic() < deadline:
            turn()
        assert "shard-0" in deaths and shard.pid is None and shard.restart_at is None
        for _ in range(5):
            turn()
        assert "shard-0" not in restarts and shard.pid is None
        sup.stop()
        assert all(c.pid is None and c.restart_at is None for c in sup.children)
    finally:
        sup.close()
        wake_r.close()
        wake_w.close()
