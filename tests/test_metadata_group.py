"""The metadata group across processes: real pysyncobj members (``python -m
mq9.cluster.member --fast``) on 127.0.0.1. One scenario, in order: bootstrap, two joins,
convergence, writes through any member, kill -9 of the leader, restart from the data dir,
removal. What a write costs is measured by ``python -m loadtest.metadata_writes``.

The tests share one cluster and depend on the ones before them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mq9.cluster import admin
from mq9.cluster.control import ControlError, call
from mq9.cluster.slots import NUM_SLOTS
from mq9.cluster.state import ClusterState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "member-test-secret-0123456789"  # Raft and control traffic sealed, as in production


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Member:
    def __init__(self, node_id: str, base: str):
        self.node_id = node_id
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = os.path.join(base, node_id)
        self.log_path = os.path.join(base, f"{node_id}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, join: str | None = None, *extra: str) -> Member:
        cmd = [sys.executable, "-m", "mq9.cluster.member", "--fast", "--node-id", self.node_id,
               "--bind", self.address, "--data-dir", self.data_dir, "--shards", "2",
               "--batch", "256", "--move-delay", "0.15", "--timeout", "20",
               "--die-with-parent", "--password", SECRET, *extra]
        if join:
            cmd += ["--join", join]
        self._log = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True)
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict:
        line = _readline(self.proc, timeout)
        assert line, f"{self.node_id} did not start:\n{self.tail()}"
        return json.loads(line)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def status(self) -> dict:
        return call(self.address, "status", password=SECRET, timeout=2.0)

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return ""
    return proc.stdout.readline()


def wait_until(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except ControlError as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def snapshots(members) -> list[dict]:
    return [call(m.address, "snapshot", password=SECRET, timeout=2.0)["state"] for m in members]


def converged(members) -> bool:
    snaps = snapshots(members)
    return all(s == snaps[0] for s in snaps)


def even(state: ClusterState | dict) -> bool:
    s = state if isinstance(state, ClusterState) else ClusterState.from_dict(state)
    counts: dict = {}
    for owner in s.slots:
        counts[owner] = counts.get(owner, 0) + 1
    shards = {(n, i) for n, info in s.members.items() for i in range(info["shards"])}
    return set(counts) == shards and max(counts.values()) - min(counts.values()) <= 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("metadata-cluster"))
    members = {n: Member(n, base) for n in ("n1", "n2", "n3")}
    yield members
    for m in members.values():
        m.stop()
    for m in members.values():
        if m.proc and m.proc.returncode not in (0, -signal.SIGKILL, None, -signal.SIGTERM):
            print(f"--- {m.node_id} exited {m.proc.returncode}\n{m.tail()}")


def test_bootstrap_then_two_joins_converge(cluster):
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    n1.start().wait_ready()
    s = n1.status()
    assert s["leader"] == "n1" and s["members"]["n1"]["slots"] == NUM_SLOTS

    n2.start(join=n1.address)
    # slots start moving to n2 once it is in; the moves are visible while they run
    seen_moves = wait_until(lambda: n1.status()["moves_total"], 15, "moves to n2")
    assert seen_moves > 0
    text = admin.format_status(n1.status())
    assert "moves in progress:" in text and ("copying" in text or "flipping" in text)
    n2.wait_ready()
    wait_until(lambda: n1.status()["slots_per_node"].get("n2") == NUM_SLOTS // 2
               and n1.status()["moves_total"] == 0, 30, "n2 to own half the slots")

    n3.start(join=n2.address)  # through a follower as seed
    n3.wait_ready()
    def spread():
        s = n1.status()
        return (s["moves_total"] == 0 and len(s["members"]) == 3
                and min(s["slots_per_node"].values()) >= 2 * (NUM_SLOTS // 6))

    wait_until(spread, 30, "slots spread over three nodes")
    wait_until(lambda: converged([n1, n2, n3]), 5, "replicas to converge")
    snap = snapshots([n1])[0]
    assert even(snap)
    assert set(snap["members"]) == {"n1", "n2", "n3"}
    for m in (n1, n2, n3):
        s = m.status()
        assert s["raft_members"] == sorted(x.address for x in (n1, n2, n3))
        assert s["leader"] == "n1" and s["ready"]
    # each join caused no election
    assert n1.status()["term"] == 1


def test_writes_from_any_member_reach_all(cluster):
    members = list(cluster.values())
    for i, m in enumerate(members):
        admin.write(m.address, "queue_group_add",
                    {"node_id": m.node_id, "subject": f"jobs.{i}", "queue": "w"}, SECRET)
    wait_until(lambda: converged(members), 5, "queue groups everywhere")
    qg = ClusterState.from_dict(snapshots(members[:1])[0]).queue_groups
    assert qg == {m.node_id: ((f"jobs.{i}", "w"),) for i, m in enumerate(members)}


def test_kill_leader_elects_a_new_one_and_writes_go_on(cluster):
    members = list(cluster.values())
    leader = next(m for m in members if m.status()["role"] == "leader")
    rest = [m for m in members if m is not leader]
    term = leader.status()["term"]
    version = leader.status()["version"]
    t0 = time.monotonic()
    leader.kill()
    def new_leader():
        s = rest[0].status()
        return s["leader"] if s["leader"] not in (None, leader.node_id) else None

    new = wait_until(new_leader, 10, "a new leader")
    elected = time.monotonic() - t0
    print(f"\nnew leader {new} elected {elected:.2f}s after kill -9 of {leader.node_id}")
    assert rest[1].status()["term"] > term or rest[0].status()["term"] > term
    res = admin.write(rest[1].address, "queue_group_add",
                      {"node_id": rest[1].node_id, "subject": "after.kill", "queue": "w"},
                      SECRET, timeout=10)
    assert res["version"] > version
    wait_until(lambda: converged(rest), 5, "survivors to agree")
    cluster["_killed"] = leader


def test_restarted_member_catches_up_without_join(cluster):
    killed = cluster.pop("_killed")
    rest = [m for m in cluster.values() if m is not killed]
    # more writes while it is down
    admin.write(rest[0].address, "queue_group_add",
                {"node_id": rest[0].node_id, "subject": "while.down", "queue": "w"}, SECRET)
    killed.start()  # no --join: node.json and the journal say who the peers are
    info = killed.wait_ready()
    assert info["node_id"] == killed.node_id
    wait_until(lambda: converged(list(cluster.values())), 10, "the restarted member to catch up")
    s = killed.status()
    assert s["leader"] not in (None, killed.node_id)
    assert s["members"][killed.node_id]["raft"] == "self"
    assert "while.down" in json.dumps(snapshots([killed])[0]["queue_groups"])


def test_remove_member_moves_its_slots_then_takes_it_out(cluster):
    members = list(cluster.values())
    leader = next(m for m in members if m.status()["role"] == "leader")
    # remove the leader: covers draining, the state removal and the leadership handover
    victim = leader
    server = next(m for m in members if m is not victim)
    said = []
    t0 = time.monotonic()
    res = admin.remove(server.address, victim.node_id, SECRET, timeout=40, progress=said.append)
    took = time.monotonic() - t0
    print(f"\nremoved {victim.node_id} (the leader) in {took:.2f}s: " + " | ".join(said))
    assert res["removed"] == victim.node_id
    rest = [m for m in members if m is not victim]
    for m in rest:
        s = m.status()
        assert victim.node_id not in s["members"]
        assert victim.address not in s["raft_members"]
        assert s["leader"] in {x.node_id for x in rest}
    snap = snapshots(rest)[0]
    assert even(snap) and not snap["moves"]
    # the removed member notices and exits by itself
    assert victim.proc.wait(15) == 0
    with open(os.path.join(victim.data_dir, "cluster", "node.json")) as f:
        assert json.load(f)["removed"]
    # the two that are left still take writes
    admin.write(rest[0].address, "noop", {}, SECRET)
    cluster.pop(victim.node_id)


def test_status_cli(cluster):
    m = next(iter(cluster.values()))
    env = {**os.environ, "MQ9_CLUSTER_SECRET": SECRET}
    out = subprocess.run([sys.executable, "-m", "mq9.cluster.admin", "status", "--server",
                          m.address], cwd=ROOT, capture_output=True, text=True, timeout=20,
                         check=False, env=env)
    assert out.returncode == 0, out.stderr
    print("\n" + out.stdout)
    assert "leader" in out.stdout and "NODE" in out.stdout
    for node_id in cluster:
        assert node_id in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mq9.cluster.admin", "status", "--server",
                          f"127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=20, check=False, env=env)
    assert bad.returncode == 1 and "error" in bad.stderr
    wrong = subprocess.run([sys.executable, "-m", "mq9.cluster.admin", "status", "--server",
                            m.address], cwd=ROOT, capture_output=True, text=True, timeout=20,
                           check=False, env={**env, "MQ9_CLUSTER_SECRET": "not-the-secret"})
    assert wrong.returncode == 1 and "wrong or missing cluster secret" in wrong.stderr
