"""`make cluster` (python -m mq9.localcluster): three real nodes of one cluster on
127.0.0.1, a mailbox used through two of them, Ctrl-C, nothing left running."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
from nodeproc import REPO, child_env
from test_readme import blocks, section

from loadtest.cluster_hop import free_port_block
from mq9 import procfs


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below ``root`` (start time: pids get reused)."""
    return {pid: st.starttime for pid in procfs.tree(root)[1:]
            if (st := procfs.stat(pid)) is not None}


def alive(procs: dict[int, int]) -> list[int]:
    return [pid for pid, start in procs.items()
            if (st := procfs.stat(pid)) is not None and st.starttime == start and st.state != "Z"]


def wait_for(what: str, check, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        if (value := check()):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s\n" + log.read_text()[-6000:])
        time.sleep(0.3)


def readme_commands(cdir: Path, nats_port: int, cluster_port: int) -> None:
    """The README's `make cluster` example, with this test's ports and directory."""
    moved = {"127.0.0.1:4222": f"127.0.0.1:{nats_port}",
             "127.0.0.1:4223": f"127.0.0.1:{nats_port + 1}",
             "127.0.0.1:4224": f"127.0.0.1:{nats_port + 2}",
             "127.0.0.1:6222": f"127.0.0.1:{cluster_port}",
             "mq9-cluster/cluster-secret": str(cdir / "cluster-secret")}
    lines = [line for line in blocks(section("A cluster on your machine"), "sh")[1].splitlines()
             if line.startswith(".venv/bin/mq9 ")]
    assert len(lines) == 4
    outputs = []
    for line in lines:
        for old, new in moved.items():
            line = line.replace(old, new)
        args = shlex.split(line)[1:]
        r = subprocess.run([sys.executable, "-m", "mq9", *args], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.stderr)
        outputs.append(r.stdout)
    assert all(re.search(rf"^n{i}\s.*\sactive\s", outputs[0], re.M) for i in (1, 2, 3)), outputs[0]
    assert outputs[3].rstrip().endswith("via n2"), outputs[3]


async def test_three_nodes_one_mailbox_ctrl_c_stops_all(tmp_path):
    base = free_port_block(40)
    nats_port, metrics_port, cluster_port = base, base + 3, base + 10
    out = tmp_path / "cluster.log"
    cdir = tmp_path / "mq9-cluster"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mq9.localcluster", "--dir", str(cdir),
             "--port", str(nats_port), "--metrics-port", str(metrics_port),
             "--cluster-port", str(cluster_port)],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            assert proc.poll() is None, out.read_text()[-6000:]
            return "3 nodes up" in out.read_text()

        wait_for("'3 nodes up'", up, 150, out)

        def status() -> dict:
            r = subprocess.run(
                [sys.executable, "-m", "mq9", "cluster", "status", "--json",
                 "--server", f"127.0.0.1:{cluster_port}",
                 "--cluster-secret-file", str(cdir / "cluster-secret")],
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        def balanced():
            st = status()
            return (sorted(st["members"]) == ["n1", "n2", "n3"] and not st["moves_total"]
                    and len(st["slots_per_node"]) == 3)

        wait_for("3 members owning slots", balanced, 90, out)
        procs = descendants(proc.pid)
        assert len(procs) >= 3 * 4  # 3 supervisors, each with 2 shards and 1 gateway

        one = await nats.connect(f"nats://127.0.0.1:{nats_port}", connect_timeout=5,
                                 max_reconnect_attempts=0)
        three = await nats.connect(f"nats://127.0.0.1:{nats_port + 2}", connect_timeout=5,
                                   max_reconnect_attempts=0)
        try:
            box = json.loads((await one.request(
                "$mq9.AI.MAILBOX.CREATE", b'{"ttl": 300}', timeout=10)).data)
            sub = await three.subscribe(f"$mq9.AI.INBOX.{box['mail_id']}.*")
            await three.flush()
            ack = json.loads((await one.request(
                f"$mq9.AI.INBOX.{box['mail_id']}.normal", b'{"via": "n1"}', timeout=10)).data)
            assert ack["mail_id"] == box["mail_id"] and "msg_id" in ack, ack
            msg = await sub.next_msg(timeout=15)
            assert json.loads(msg.data) == {"via": "n1"}
        finally:
            await one.close()
            await three.close()

        readme_commands(cdir, nats_port, cluster_port)

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends it (the nodes have their own sessions)
        assert proc.wait(90) == 0, out.read_text()[-6000:]
        assert "stopping n1, n2, n3" in out.read_text()
        deadline = time.monotonic() + 10
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(procs)
    finally:
        if proc.poll() is None:
            proc.kill()  # the nodes get SIGTERM from the kernel (their death signal)
            proc.wait(10)
