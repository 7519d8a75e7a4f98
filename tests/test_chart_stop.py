"""The chart's preStop hook against a real node (issue 10, item 14: lame duck on stop).

The pod is played by hand: a real ``mq9 node`` with the MQ9_* settings the rendered
container gets (lame duck shortened to keep the test short), clients connected to it; then
the rendered preStop command runs with /data pointing at the node's data dir and the
kubelet's SIGTERM follows right after the hook has sent its signal, as it would if the
hook returned. The node must go into lame duck (clients told, not cut off at once), ignore
that SIGTERM, and exit 0 by itself well within terminationGracePeriodSeconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodeproc import Node, child_env  # noqa: E402
from test_packaging import container, render, statefulset  # noqa: E402

GRACE, DURATION = 2, 6  # seconds: the chart's 10 and 30, shortened


def client(node: Node) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"INFO ")
    sock.sendall(b'CONNECT {"verbose":false,"protocol":1}\r\nPING\r\n')
    assert f.readline() == b"PONG\r\n"
    return sock, f


def test_prestop_hook_lame_ducks_the_node(tmp_path):
    rendered = render({"lameDuck": {"gracePeriodSeconds": GRACE, "durationSeconds": DURATION}})
    c = container(rendered)
    kill_after = statefulset(rendered)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    env = {e["name"]: e["value"] for e in c["env"]
           if e["name"].startswith("MQ9_") and "value" in e}
    assert (env["MQ9_LAME_DUCK_GRACE_PERIOD"], env["MQ9_LAME_DUCK_DURATION"]) == (str(GRACE),
                                                                                 str(DURATION))
    node = Node(tmp_path / "node", env=env, gateways=1)
    # `mq9` on the hook's PATH is this tree's, as the image's is
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mq9").write_text(f'#!/bin/sh\nexec {sys.executable} -m mq9 "$@"\n')
    (bindir / "mq9").chmod(0o755)
    script = hook[2].replace("/data", node.data_dir)
    try:
        node.start()
        clients = [client(node) for _ in range(5)]
        started = time.monotonic()
        hook_proc = subprocess.Popen(hook[:2] + [script], env=child_env(
            {"PATH": f"{bindir}:{os.environ['PATH']}"}), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # lame duck: INFO with "ldm" reaches every client (nats-server's notice); other
            # asynchronous INFOs may come first
            for sock, f in clients:
                while True:
                    line = f.readline()
                    assert line, "closed before an INFO with ldm"
                    if line == b"PING\r\n":
                        sock.sendall(b"PONG\r\n")
                    elif line.startswith(b"INFO ") and json.loads(line[5:]).get("ldm"):
                        break
            node.signal(signal.SIGTERM)  # the kubelet's, once the hook would have returned
            # the node then closes its clients itself, none before the grace period
            for _sock, f in clients:
                while f.readline():
                    pass
                assert time.monotonic() - started >= GRACE
            assert node.proc.wait(timeout=kill_after) == 0
            assert time.monotonic() - started < kill_after
        finally:
            if hook_proc.poll() is None:  # the container's end would take the hook with it
                os.killpg(hook_proc.pid, signal.SIGKILL)
            out = hook_proc.communicate(timeout=10)[0].decode()
        assert "Traceback" not in out, out
    finally:
        node.close()
