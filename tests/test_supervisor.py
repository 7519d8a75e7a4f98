"""A node (``mq9/node.py`` with its ``mq9/supervisor.py``) and the ``mq9`` command, run as
real processes; at the end the ``Supervisor`` class on its own.

Process tests run twice: with the real gateway and shard (``real``) and with small
stand-ins defined below (``standin``), which pin down the supervisor's own behaviour
independently of the gateway and shard code. The failure-mode tests need children that
misbehave, so they run with the stand-ins only. The supervisor's children import the
stand-ins from this file as ``test_supervisor`` (tests/ is on their path).
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

TESTS = str(Path(__file__).resolve().parent)
sys.path.insert(0, TESTS)

from nodeproc import Node, child_env, free_port  # noqa: E402

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
    return node.run_node(cfg, targets={"gateway": "test_supervisor:standin_gateway",
                                       "shard": "test_supervisor:standin_shard"})


# spawned children inherit sys.path, so they find test_supervisor too
STANDIN_COMMAND = [sys.executable, "-c",
                   f"import sys; sys.path.insert(0, {TESTS!r}); "
                   "from test_supervisor import standin_node; "
                   "sys.exit(standin_node(sys.argv[1:]))"]

# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["standin", "real"])
def mode(request):
    return request.param


def _maker(base: Path, mode: str):
    made = []

    def make(start=True, **kw):
        if mode == "standin":
            kw.setdefault("command", STANDIN_COMMAND)
        n = Node(base / f"node{len(made)}", **kw)
        made.append(n)
        return n.start() if start else n

    return make, made


@pytest.fixture
def make_node(tmp_path, mode):
    make, made = _maker(tmp_path, mode)
    yield make
    for n in made:
        n.close()


@pytest.fixture
def make_standin(tmp_path):
    make, made = _maker(tmp_path, "standin")
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


def test_second_node_on_the_same_data_dir_is_refused(make_standin, tmp_path):
    first = make_standin()
    second = make_standin(start=False, data_dir=first.data_dir)
    second.start(wait=False)
    assert second.proc.wait(15) == 1
    assert "event=data_dir_in_use" in second.log_text()
    assert first.http_get("/readyz") == (200, OK)  # and the first one did not notice


def test_nats_port_in_use_is_refused(make_standin):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        node = make_standin(start=False, port=holder.getsockname()[1])
        node.start(wait=False)
        assert node.proc.wait(15) == 1
    assert "event=port_unavailable" in node.log_text()
    assert node.wait_gone(timeout=1) == []


def test_a_shard_that_cannot_start_fails_the_node(make_standin):
    node = make_standin(start=False, env={"STANDIN_SHARD": "crash"})
    node.start(wait=False)
    assert node.proc.wait(15) == 1, node.log_tail()
    log = node.log_text()
    assert "event=shard_failed_to_start" in log
    assert re.search(r"level=error proc=shard-\d event=child_crashed .*crashing on purpose", log), log


def test_a_crash_looping_gateway_backs_off_and_sigterm_still_works(make_standin):
    node = make_standin(start=False, env={"STANDIN_GATEWAY": "crash"})
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


def test_a_second_signal_kills_children_that_ignore_sigterm(make_standin):
    node = make_standin(start=False, env={"STANDIN_SHARD": "slow-stop"})
    node.start()
    children = node.pids()
    node.signal(signal.SIGTERM)
    # the kernel merges a signal sent while the same one is still pending
    _wait(lambda: "event=node_stopping" in node.log_text(), 5, "node_stopping", node)
    node.signal(signal.SIGINT)  # skips the bounded wait
    assert node.proc.wait(10) == 0, node.log_tail()
    assert node.wait_gone(children, timeout=2) == []
    assert "event=child_killed" in node.log_text()


def test_sigterm_while_shards_start_exits_0(make_standin):
    node = make_standin(start=False, env={"STANDIN_SHARD": "silent"})
    node.start(wait=False)
    _wait(lambda: node.log_text().count("event=child_started") >= 2, 15, "shards spawned", node)
    children = node.pids()
    assert node.stop(timeout=15) == 0, node.log_tail()
    assert node.wait_gone(children, timeout=2) == []


# ---- the Supervisor class on its own, in this process --------------------------------------


def test_supervisor_restarts_with_back_off_retires_and_stops(tmp_path):
    from mq9.supervisor import Supervisor

    wake_r, wake_w = socket.socketpair()
    deaths, restarts = [], []
    cfg = config.Config(host="127.0.0.1", data_dir=str(tmp_path), gateways=1, shards=1,
                        log_level="error")
    sup = Supervisor(cfg, {"gateway": "test_supervisor:standin_exit",
                           "shard": "test_supervisor:standin_idle"},
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
