"""A metadata-group member on its own, without gateways or shards: for tests and for
debugging the control plane.

    python -m mq9.cluster.member --node-id n1 --bind 127.0.0.1:7001 --data-dir /tmp/n1
    python -m mq9.cluster.member --node-id n2 --bind 127.0.0.1:7002 --data-dir /tmp/n2 \\
        --join 127.0.0.1:7001
    python -m mq9.cluster.admin status --server 127.0.0.1:7001

It runs the rebalancer with ``MetadataOnlyMover`` (ownership moves, no data does). Prints
one JSON line ``{"event": "ready", ...}`` on stdout once it is a member, logs as logfmt on
stderr, stops on SIGTERM/SIGINT, and exits by itself once it has been removed from the
cluster and its peers have let go of it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import sys
import threading
import time

from mq9 import log
from mq9.cluster.control import ControlError, call
from mq9.cluster.metadata import ClusterError, MetadataGroup, RaftTiming
from mq9.cluster.rebalance import MetadataOnlyMover, Rebalancer
from mq9.cluster.state import raft_address


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mq9.cluster.member")
    p.add_argument("--node-id")
    p.add_argument("--bind", default="127.0.0.1:6222", help="host:cluster_port to listen on")
    p.add_argument("--advertise", help="host other members use (default: from --bind)")
    p.add_argument("--data-dir", default="./mq9-data")
    p.add_argument("--join", help="any member's host:cluster_port")
    p.add_argument("--rejoin", action="store_true", help="join again after being removed")
    p.add_argument("--password", help="cluster secret")
    p.add_argument("--nats-port", type=int, default=4222)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--fast", action="store_true", help="short Raft timeouts (tests)")
    p.add_argument("--no-rebalance", action="store_true")
    p.add_argument("--move-delay", type=float, default=0.0,
                   help="seconds each batch of moves 'copies' (to watch moves in progress)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--die-with-parent", action="store_true",
                   help="exit when the parent process does (tests: no strays)")
    a = p.parse_args(argv)
    if a.die_with_parent:
        _die_with_parent()

    log.setup(a.log_level, proc=f"member-{a.node_id or 'x'}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    group = MetadataGroup(a.node_id, a.bind, a.advertise, a.data_dir, password=a.password,
                          nats_port=a.nats_port, shards=a.shards, gateways=a.gateways,
                          timing=RaftTiming.fast() if a.fast else None)
    removed_at: list[float] = []
    group.on_removed(lambda: removed_at.append(time.monotonic()))
    try:
        group.open(join=a.join, timeout=a.timeout, rejoin=a.rejoin)
    except ClusterError as e:
        log.error("member_start_failed", code=e.code, error=str(e))
        group.close()
        return 1
    rebalancer = None
    if not a.no_rebalance:
        rebalancer = Rebalancer(group, MetadataOnlyMover(a.move_delay), batch=a.batch,
                                interval=0.2 if a.fast else 0.5).start()
    print(json.dumps({"event": "ready", "node_id": group.node_id, "address": group.address,
                      "leader": group.leader()}), flush=True)

    while not stop.wait(0.2):
        if removed_at and _raft_let_go(group, a.password):
            log.info("member_exit_removed")
            break
        if removed_at and time.monotonic() - removed_at[0] > 60:
            log.info("member_exit_removed", raft_removal="not seen")
            break
    if rebalancer:
        rebalancer.stop()
    group.close()
    return 0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, Linux
    except (OSError, AttributeError):
        pass


def _raft_let_go(group: MetadataGroup, password: str | None) -> bool:
    """Whether the remaining members have taken this node out of Raft too. Until then it
    stays a voter: a two-member group needs both votes to remove one of them."""
    s = group.snapshot()
    for info in s.members.values():
        try:
            other = call(raft_address(info), "status", password=password, timeout=1.0)
        except ControlError:
            continue
        return group.address not in other["raft_members"]
    return False


if __name__ == "__main__":
    sys.exit(main())
