"""What ``mq9 cluster status`` and ``mq9 cluster remove`` do, against any member's
``--cluster-port`` (see ``mq9.cluster.control`` for the wire).

    python -m mq9.cluster.admin status --server 127.0.0.1:6222 [--json]
    python -m mq9.cluster.admin remove NODE --server 127.0.0.1:6222 [--force]

Both need the cluster secret (``--cluster-secret``, ``--cluster-secret-file`` or
``MQ9_CLUSTER_SECRET``): members drop connections that do not authenticate with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from mq9.cluster.control import Answer, ControlError, call, call_retry
from mq9.cluster.raft import Args

# ``say(text)``: progress for the operator; ``left()``: seconds left before the deadline
Say = Callable[[str], None]
Left = Callable[[], float]


class AdminError(Exception):
    pass


def status(server: str, password: str | None = None, timeout: float = 5.0) -> Answer:
    """The metadata group as ``server`` sees it (its replica, its view of Raft)."""
    return call(server, "status", password=password, timeout=timeout)


def write(server: str, op: str, args: Args, password: str | None = None,
          timeout: float = 30.0) -> Answer:
    """One state operation through ``server`` (it forwards to the leader). State
    operations are idempotent, so retrying after a lost answer is safe."""
    return call_retry(server, "write", {"op": op, "args": args}, password=password,
                      timeout=timeout)


def format_status(s: Answer) -> str:
    """``s`` is a member's ``status`` answer (``MetadataGroup.status``)."""
    lines: list[str] = []
    leader = s.get("leader") or "none"
    if s.get("leader_address") and s.get("leader") != s.get("leader_address"):
        leader += f" ({s['leader_address']})"
    lines.append(f"cluster {s.get('cluster_id') or '(not bootstrapped)'}  "
                 f"version {s.get('version')}")
    lines.append(f"leader {leader}  term {s.get('term')}  commit {s.get('commit_index')}  "
                 f"(as seen by {s.get('node_id')}, {s.get('role')}"
                 f"{'' if s.get('has_quorum') else ', NO QUORUM'})")
    lines.append("")
    rows = [("NODE", "ADDRESS", "NATS", "SHARDS", "SLOTS", "PER SHARD", "STATE", "RAFT")]
    for nid, m in sorted(s.get("members", {}).items()):
        role = m.get("raft", "")
        if m.get("address") == s.get("leader_address"):
            role += ", leader"
        rows.append((nid, m.get("address", ""), str(m.get("nats_port", "")),
                     str(m.get("shards", "")), str(m.get("slots", 0)),
                     "/".join(str(c) for c in m.get("slots_per_shard", [])),
                     m.get("state", "") + (", lame duck" if m.get("lame_duck") else ""),
                     role))
    for addr in s.get("raft_only", []):
        rows.append(("?", addr, "", "", "", "", "joining", "raft only"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if s.get("unassigned_slots"):
        lines.append(f"\n{s['unassigned_slots']} slots owned by nodes no longer members")
    total = s.get("moves_total", 0)
    lines.append("")
    if not total:
        lines.append("moves in progress: none")
    else:
        by = s.get("moves_by_state", {})
        lines.append(f"moves in progress: {total} ("
                     + ", ".join(f"{k} {v}" for k, v in by.items() if v) + ")")
        shown = s.get("moves", [])[:20]
        for m in shown:
            lines.append(f"  slot {m['slot']:>4}  {m['from'][0]}/{m['from'][1]} -> "
                         f"{m['to'][0]}/{m['to'][1]}  {m['state']}")
        if total > len(shown):
            lines.append(f"  ... {total - len(shown)} more")
    return "\n".join(lines)


def _draining_done(s: Answer, node_id: str) -> bool:
    busy = any(node_id in (m["from"][0], m["to"][0]) for m in s.get("moves", []))
    more = s.get("moves_total", 0) > len(s.get("moves", []))
    return s["slots_per_node"].get(node_id, 0) == 0 and not busy and not more


def remove(server: str, node_id: str, password: str | None = None, timeout: float = 300.0,
           force: bool = False, progress: Say | None = None) -> dict[str, object]:
    """Takes ``node_id`` out of the cluster: marks it leaving, waits while the leader's
    rebalancer moves its slots to the others, removes it from the state and then from
    Raft (handing leadership over first if it leads). ``force`` skips the copying and
    hands its slots over at once: for a node that is gone for good, whose data is lost.
    ``progress(text)`` is told what is happening."""
    say: Say = progress or (lambda text: None)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    s = status(server, password)
    members = s["members"]
    if node_id not in members:
        # a half-joined node exists in Raft only; accept its address as the name
        if node_id in s["raft_members"]:
            _remove_from_raft(server, node_id, s, password, left, say)
            return {"removed": node_id, "raft_only": True}
        raise AdminError(f"no member {node_id} (members: {', '.join(sorted(members))})")
    address = members[node_id]["address"]
    others = [m["address"] for n, m in sorted(members.items()) if n != node_id]
    if not others:
        raise AdminError("cannot remove the last member")
    # talk to a member that stays, so the conversation survives the removal
    via = server if server != address else others[0]

    if force:
        say(f"removing {node_id} at once; its slots go to the others without copying")
        res = write(via, "remove_member", {"node_id": node_id, "force": True}, password, left())
        reassigned = res.get("reassigned", 0)
    else:
        write(via, "set_leaving", {"node_id": node_id, "leaving": True}, password, left())
        say(f"{node_id} is leaving; moving its {members[node_id]['slots']} slots away")
        last = None
        while True:
            s = call_retry(via, "status", password=password, timeout=left())
            remaining = s["slots_per_node"].get(node_id, 0)
            if _draining_done(s, node_id):
                break
            if remaining != last:
                say(f"  {remaining} slots left on {node_id}, {s['moves_total']} moves in progress")
                last = remaining
            if time.monotonic() > deadline:
                raise AdminError(f"{node_id} still owns {remaining} slots after {timeout:.0f}s; "
                                 f"is the leader's rebalancer running? (it stays 'leaving'; "
                                 f"run remove again to wait more, or --force)")
            time.sleep(0.2)
        write(via, "remove_member", {"node_id": node_id}, password, left())
        reassigned = 0
    say(f"{node_id} removed from the metadata; removing it from Raft")
    _remove_from_raft(via, address, status(via, password), password, left, say)
    return {"removed": node_id, "address": address, "reassigned": reassigned}


def _remove_from_raft(via: str, address: str, s: Answer, password: str | None, left: Left,
                      say: Say) -> None:
    if s.get("leader_address") == address:
        say(f"{address} leads; handing leadership over")
        while True:
            try:
                call(address, "transfer", password=password, timeout=2.0)
            except ControlError as e:
                if e.code not in ("unreachable", "unauthenticated", "denied", "not_leader"):
                    raise
            time.sleep(0.3)
            s = call_retry(via, "status", password=password, timeout=left())
            if s.get("leader_address") not in (None, address):
                break
            if left() <= 1.0:
                raise AdminError(f"{address} kept the leadership")
    while address in s["raft_members"]:
        try:
            call(via, "remove_node", {"address": address}, password=password, timeout=2.0)
        except ControlError as e:
            if e.code not in ("unreachable", "unauthenticated", "denied", "no_leader", "retry"):
                raise
        time.sleep(0.2)
        s = call_retry(via, "status", password=password, timeout=left())
        if left() <= 1.0 and address in s["raft_members"]:
            raise AdminError(f"Raft did not drop {address}: {s['membership_results'].get(address)}")


def _secret(a: argparse.Namespace) -> str:
    if a.cluster_secret_file:
        try:
            with open(a.cluster_secret_file, encoding="utf-8") as f:
                return f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AdminError(f"--cluster-secret-file: {e}") from None
    secret = a.password or os.environ.get("MQ9_CLUSTER_SECRET")
    if not secret:
        # Without one the member would drop the connection; say why up front instead.
        raise AdminError("the cluster secret is needed: --cluster-secret, "
                         "--cluster-secret-file or MQ9_CLUSTER_SECRET")
    return secret


def build_parser(prog: str = "python -m mq9.cluster.admin") -> argparse.ArgumentParser:
    """The command's flags (also read by ``mq9 completion``)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("status", help="members, leader, term, slots per node, moves")
    ps.add_argument("--json", action="store_true")
    pr = sub.add_parser("remove", help="move a node's slots away and take it out")
    pr.add_argument("node")
    pr.add_argument("--force", action="store_true",
                    help="do not copy its data (the node is gone for good)")
    pr.add_argument("--timeout", type=float, default=600.0)
    for q in (ps, pr):
        q.add_argument("--server", required=True, help="any member's host:cluster_port")
        q.add_argument("--cluster-secret", "--password", dest="password",
                       help="the cluster's secret (env MQ9_CLUSTER_SECRET)")
        q.add_argument("--cluster-secret-file", help="file whose first line is the secret")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m mq9.cluster.admin") -> int:
    a = build_parser(prog).parse_args(argv)
    try:
        a.password = _secret(a)
        if a.cmd == "status":
            s = status(a.server, a.password)
            print(json.dumps(s, indent=1, sort_keys=True, default=list) if a.json
                  else format_status(s))
        else:
            res = remove(a.server, a.node, a.password, timeout=a.timeout, force=a.force,
                         progress=lambda t: print(t, flush=True))
            print(f"removed {res['removed']}")
    except (ControlError, AdminError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
