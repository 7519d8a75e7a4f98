"""What the hop between nodes costs: acked mailbox sends through the owning node vs through
another node, on a two-node cluster on 127.0.0.1.

    python -m loadtest.cluster_hop [--count N]
    python -m loadtest.cluster_hop --moves 100000   # join nodes 2-4, time the slot moves

Prints acks/s and the CPU seconds all processes of both nodes used per 1,000 acked sends,
for each path. A 2-core machine cannot show scale-out, so CPU per message is the figure that
predicts it: the extra hop's cost is the difference between the two rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mq9 import procfs
from mq9.bench import rawnats as rn

ROOT = Path(__file__).resolve().parent.parent
SECRET = "cluster-hop-bench-secret"  # cluster mode needs one; the hop then runs over CURVE


def free_port_block(width: int) -> int:
    """A free port whose next ``width`` ports are free too (a node's cluster + data ports)."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        socks = []
        try:
            for p in range(base, base + width + 1):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants still alive."""
    return procfs.cpu_seconds(procfs.tree(pid))


def _start(tmp: Path, name: str, join: int | None) -> tuple[subprocess.Popen, int, int]:
    nats_port = free_port_block(0)
    cluster_port = free_port_block(5)
    args = [sys.executable, "-m", "mq9", "node", "--host", "127.0.0.1", "--port", str(nats_port),
            "--metrics-port", "0", "--data-dir", str(tmp / name), "--cluster-port", str(cluster_port),
            "--node-id", name, "--advertise", "127.0.0.1", "--gateways", "2", "--shards", "2",
            "--max-msgs", "1000000"]
    if join:
        args += ["--join", f"127.0.0.1:{join}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQ9_")}
    env["MQ9_CLUSTER_SECRET"] = SECRET
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", nats_port), timeout=0.5).close()
            return proc, nats_port, cluster_port
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not start")


def _balanced(cluster_port: int, nodes: int = 2) -> bool:
    out = subprocess.run([sys.executable, "-m", "mq9", "cluster", "status", "--json", "--server",
                          f"127.0.0.1:{cluster_port}"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "MQ9_CLUSTER_SECRET": SECRET})
    if out.returncode:
        return False
    st = json.loads(out.stdout)
    per = st["slots_per_node"]
    return (len(per) == nodes and not st["moves_total"]
            and max(per.values()) - min(per.values()) <= 4)


async def _acked(port: int, mail_ids: list[str], count: int, inflight: int = 1000) -> float:
    nc = await rn.connect(port=port, name="hop")
    done = sent = 0
    finished = asyncio.get_running_loop().create_future()
    payload = b"h" * 256

    def on_ack(_hdr, _data):
        nonlocal done
        done += 1
        if sent < count:
            send_one()
        elif done == count and not finished.done():
            finished.set_result(None)

    def send_one():
        nonlocal sent
        nc.request_cb(f"$mq9.AI.INBOX.{mail_ids[sent % len(mail_ids)]}.normal", payload, on_ack)
        sent += 1

    t0 = time.monotonic()
    for _ in range(min(inflight, count)):
        send_one()
    await asyncio.wait_for(finished, 120)
    return count / (time.monotonic() - t0)


async def _create(port: int, names: list[str], payload: bytes | None = None,
                  inflight: int = 500) -> None:
    """Create mailboxes ``names`` (pipelined), and store ``payload`` in each if given."""
    nc = await rn.connect(port=port, name="create")
    sem = asyncio.Semaphore(inflight)
    loop = asyncio.get_running_loop()

    async def one(subject: str, body: bytes) -> None:
        async with sem:
            fut = loop.create_future()
            nc.request_cb(subject, body, lambda h, d: fut.done() or fut.set_result(d))
            await asyncio.wait_for(fut, 30)

    await asyncio.gather(*(one("$mq9.AI.MAILBOX.CREATE", json.dumps({"name": n, "ttl": 0}).encode())
                           for n in names))
    if payload is not None:
        await asyncio.gather(*(one(f"$mq9.AI.INBOX.{n}.normal", payload) for n in names))


def move_bench(tmp: Path, mailboxes: int, procs: list) -> None:
    """Join nodes 2, 3 and 4 to a node holding ``mailboxes`` mailboxes (one 256 B message
    each) and time each join until the slots are balanced again."""
    p1, port1, cport1 = _start(tmp, "m1", None)
    procs.append(p1)
    t0 = time.monotonic()
    asyncio.run(_create(port1, [f"mb-{i}" for i in range(mailboxes)], b"m" * 256))
    print(f"{mailboxes:,} mailboxes with one 256 B message each created in "
          f"{time.monotonic() - t0:.1f} s on node m1")
    for n in (2, 3, 4):
        t0 = time.monotonic()
        p, _, _ = _start(tmp, f"m{n}", cport1)
        procs.append(p)
        started = time.monotonic() - t0
        while not _balanced(cport1, n):
            if time.monotonic() - t0 > 600:
                raise RuntimeError("cluster did not balance")
            time.sleep(0.5)
        took = time.monotonic() - t0
        moved = mailboxes // n  # each join moves about 1/n of the mailboxes to the new node
        print(f"join of node {n}: serving after {started:.1f} s, balanced after {took:.1f} s "
              f"(~{moved:,} mailboxes moved, ~{moved / took:,.0f} mailboxes/s, "
              f"~{moved * 300 / took / 1e6:.2f} MB/s of records)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=30_000)
    ap.add_argument("--moves", type=int, metavar="MAILBOXES", default=0,
                    help="instead: time joins of nodes 2-4 to a node holding this many mailboxes")
    a = ap.parse_args()
    rn.install_uvloop()
    tmp = Path(tempfile.mkdtemp(prefix="mq9-hop-"))
    procs = []
    try:
        if a.moves:
            move_bench(tmp, a.moves, procs)
            return 0
        p1, port1, cport1 = _start(tmp, "h1", None)
        procs.append(p1)
        p2, port2, _ = _start(tmp, "h2", cport1)
        procs.append(p2)
        deadline = time.monotonic() + 90
        while not _balanced(cport1):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not balance")
            time.sleep(0.5)
        time.sleep(1.0)
        from mq9.cluster.slots import slot_of
        from mq9.cluster.state import read_snapshot

        snap = read_snapshot(str(tmp / "h1" / "cluster" / "state.json"))
        names = [n for n in (f"hop-{i}" for i in range(2000)) if snap.slots[slot_of(n)][0] == "h1"][:50]
        asyncio.run(_create(port1, names))
        print(f"two-node cluster on 127.0.0.1, {os.cpu_count()} CPUs; {a.count} acked sends of 256 B, "
              f"1000 in flight, to {len(names)} mailboxes owned by node h1")
        print(f"{'path':<34} {'acks/s':>10} {'CPU s / 1000 sends':>20}")
        for label, port in (("client on the owner (h1)", port1), ("client on the other node (h2)", port2)):
            before = _cpu(p1.pid) + _cpu(p2.pid)
            rate = asyncio.run(_acked(port, names, a.count))
            used = _cpu(p1.pid) + _cpu(p2.pid) - before
            print(f"{label:<34} {rate:>10,.0f} {used / a.count * 1000:>20.3f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
