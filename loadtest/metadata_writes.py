"""What one write to the metadata group costs: p50/p99/max of a replicated no-op on a group
of three members on 127.0.0.1 (fast Raft timings, cluster secret on, as in production).

    python -m loadtest.metadata_writes [--writes 300]

The member that writes runs in this process; the other two are ``python -m
mq9.cluster.member`` processes. Each figure is measured twice, first with this member
leading, then after it hands the leadership over (its writes are then forwarded):

- ``write()``: ``MetadataGroup.write``, blocking, as the supervisor and the rebalancer call
  it (one Raft round trip plus the wake-up of the waiting thread);
- ``raft``: the next write submitted from the previous one's callback on pysyncobj's
  thread (the Raft round trip alone).

The other members' logs go to files in a temporary directory; at the end the number of
pysyncobj's "truncating already-applied log entries" lines in them is printed (pysyncobj
logs one when a leader resends entries a follower already applied, which writes this fast
provoke; the entries are identical, the state does not diverge).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

from mq9.cluster.metadata import MetadataGroup, RaftTiming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "metadata-writes-bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_member(node_id: str, base: str, join: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mq9.cluster.member", "--fast", "--node-id", node_id,
           "--bind", f"127.0.0.1:{free_port()}", "--data-dir", os.path.join(base, node_id),
           "--password", SECRET, "--join", join, "--no-rebalance", "--die-with-parent",
           "--log-level", "warning"]
    with open(os.path.join(base, f"{node_id}.log"), "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file,
                                text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(60) or json.loads(proc.stdout.readline() or "{}").get("event") != "ready":
        proc.kill()
        raise SystemExit(f"member {node_id} did not start")
    return proc


def blocking(group: MetadataGroup, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        group.write("noop", {}, timeout=5.0)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def chained(group: MetadataGroup, n: int) -> list[float]:
    out: list[float] = []
    done = threading.Event()
    failed: list[str] = []
    t0 = [0.0]

    def one(res=None, code=None, first=False):
        if not first:
            if code is not None:
                failed.append(code)
                return done.set()
            out.append((time.perf_counter() - t0[0]) * 1000)
            if len(out) == n:
                return done.set()
        t0[0] = time.perf_counter()
        group.raft.submit("noop", {}, one)

    one(first=True)
    if not done.wait(5.0 + n * 0.1) or failed:
        raise SystemExit(f"chained writes failed: {failed or 'timeout'}")
    return out


def figures(lat: list[float]) -> str:
    lat = sorted(lat)
    return (f"p50 {lat[len(lat) // 2]:.2f} ms  p99 {lat[max(0, int(len(lat) * 0.99) - 1)]:.2f} ms"
            f"  max {lat[-1]:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.metadata_writes")
    p.add_argument("--writes", type=int, default=300)
    a = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="mq9-metadata-writes-")
    group = MetadataGroup("w", f"127.0.0.1:{free_port()}", "127.0.0.1", os.path.join(base, "w"),
                          password=SECRET, timing=RaftTiming.fast()).open(timeout=30)
    procs = []
    try:
        for node_id in ("m2", "m3"):
            procs.append(start_member(node_id, base, group.address))
        for role in ("leader", "follower"):
            if role == "follower":
                group.transfer_leadership(timeout=10)
            group.sync(10)
            for how, run in (("write()", blocking), ("raft", chained)):
                print(f"metadata write, 3 members, {how:8} on the {role:8}: "
                      f"{figures(run(group, a.writes))}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        group.close()
    truncations = 0
    for node_id in ("m2", "m3"):
        with open(os.path.join(base, f"{node_id}.log")) as f:
            truncations += sum("truncating already-applied" in line for line in f)
    print(f"followers' pysyncobj 'truncating already-applied' lines: {truncations}; logs in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
