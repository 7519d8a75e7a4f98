"""The cluster's replicated metadata as plain data, and the transitions that change it.

Every member of the metadata group holds one ``ClusterState`` and applies the same
operations in the same (Raft log) order, so each transition here must be a pure,
deterministic function of (state, arguments): no clock, no randomness, no I/O. Values that
are naturally "now" (``joined_at``) are chosen by the caller and travel in the arguments.

An invalid operation raises ``StateError`` and leaves the state alone. Because every
replica validates against the same state, every replica rejects the same operations, so a
rejected write is a no-op everywhere rather than a divergence.

Writes may be retried after a timeout whose outcome is unknown (the first attempt may
still commit), so each transition is idempotent: repeating it is accepted and changes
nothing. Moves carry an ``id`` so that a late duplicate ``finish_moves`` cannot act on a
newer move of the same slot.

The state is stored and shipped as JSON-able dicts (``to_dict``/``from_dict``): the Raft
snapshot and the file that gateways read hold that form, not pickled classes, so renaming
this module can never make an old snapshot unreadable.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NotRequired, TypedDict, cast

from mq9.cluster.slots import NUM_SLOTS, ShardId, slot_of

MOVE_STATES = ("copying", "flipping")
MEMBER_STATES = ("active", "leaving")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Slots a single start_moves may carry. pysyncobj splits a log entry of 64 KiB or more
# into chunks and its reassembly is off by one at the end, so entries stay well below that.
MAX_MOVES_PER_OP = 256

MoveState = Literal["copying", "flipping"]
MemberState = Literal["active", "leaving"]


class MemberInfo(TypedDict):
    """One member as the state holds it; advertise:nats_port is its client URL (INFO
    connect_urls), advertise:cluster_port its Raft address."""

    advertise: str
    cluster_port: int
    nats_port: int
    shards: int
    gateways: int
    joined_at: float
    state: MemberState
    # absent rather than false, so a member that never used it reads as in older states
    lame_duck: NotRequired[bool]


# "from" is a keyword, hence the functional form.
Move = TypedDict("Move", {"id": int, "from": ShardId, "to": ShardId, "state": MoveState})
# A move with its slot, as the rebalancer drives it and a mover carries it out.
SlotMove = TypedDict("SlotMove", {"slot": int, "id": int, "from": ShardId, "to": ShardId,
                                  "state": MoveState})
# A move the planner proposes, before it has an id.
PlannedMove = TypedDict("PlannedMove", {"slot": int, "from": ShardId, "to": ShardId})
# (subject, queue) with members on a node
QueueGroup = tuple[str, str]
# What a transition answers; it travels back to the writer as JSON.
OpResult = dict[str, object]
Transition = tuple["ClusterState", OpResult]


class StateError(Exception):
    """An operation that the current state refuses. ``code`` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClusterState:
    """One version of the metadata. Treat as immutable: transitions build a new one, so a
    reader holding a reference always sees a consistent whole."""

    cluster_id: str = ""
    version: int = 0
    members: dict[str, MemberInfo] = field(default_factory=dict)
    # NUM_SLOTS owners once bootstrapped, empty before
    slots: tuple[ShardId, ...] = ()
    # slot -> the move under way
    moves: dict[int, Move] = field(default_factory=dict)
    # node_id -> sorted tuple of (subject, queue) that have members on that node
    queue_groups: dict[str, tuple[QueueGroup, ...]] = field(default_factory=dict)

    @property
    def bootstrapped(self) -> bool:
        return bool(self.members)

    def owner(self, slot: int) -> ShardId:
        return self.slots[slot]

    def owner_of(self, mail_id: str) -> ShardId:
        return self.slots[slot_of(mail_id)]

    def address_of(self, node_id: str) -> str:
        return raft_address(self.members[node_id])

    def node_at(self, address: str) -> str | None:
        for node_id, info in self.members.items():
            if raft_address(info) == address:
                return node_id
        return None

    def shard_owners(self, node_id: str) -> list[int | None]:
        """For one node: slot -> local shard, or None where another node owns the slot.
        The shape a node's gateways and shards need for their own slots."""
        return [shard if node == node_id else None for node, shard in self.slots]

    def queue_group_nodes(self, subject: str, queue: str) -> list[str]:
        return sorted(n for n, groups in self.queue_groups.items() if (subject, queue) in groups)

    # ---- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        return {
            "cluster_id": self.cluster_id,
            "version": self.version,
            "members": {n: dict(info) for n, info in self.members.items()},
            "slots": [[n, s] for n, s in self.slots],
            "moves": {str(slot): {"id": m["id"], "from": list(m["from"]), "to": list(m["to"]),
                                  "state": m["state"]}
                      for slot, m in sorted(self.moves.items())},
            "queue_groups": {n: [list(g) for g in groups]
                             for n, groups in sorted(self.queue_groups.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterState:
        """``d`` is decoded JSON (a snapshot, a state file): its shape is trusted, as
        this module wrote it."""
        return cls(
            cluster_id=d.get("cluster_id", ""),
            version=int(d.get("version", 0)),
            members={n: cast(MemberInfo, dict(info)) for n, info in d.get("members", {}).items()},
            slots=tuple((n, int(s)) for n, s in d.get("slots", ())),
            moves={int(slot): {"id": int(m["id"]), "from": (m["from"][0], int(m["from"][1])),
                               "to": (m["to"][0], int(m["to"][1])), "state": m["state"]}
                   for slot, m in d.get("moves", {}).items()},
            queue_groups={n: tuple((s, q) for s, q in groups)
                          for n, groups in d.get("queue_groups", {}).items()},
        )


def raft_address(info: Mapping[str, object]) -> str:
    """The member's identity in pysyncobj: the ``host:port`` others connect to."""
    return f"{info['advertise']}:{info['cluster_port']}"


# ---- reading helpers -------------------------------------------------------------------

def client_url(info: Mapping[str, object]) -> str:
    """The member's NATS address as INFO's ``connect_urls`` carries it (``host:port``)."""
    host = str(info["advertise"])
    return f"[{host}]:{info['nats_port']}" if ":" in host else f"{host}:{info['nats_port']}"


def client_urls(members: Mapping[str, Mapping[str, object]], exclude: str | None = None) -> list[str]:
    """What clients may fail over to: the NATS address of every member (of
    ``ClusterState.members``) except those leaving the cluster or in lame-duck mode, and
    ``exclude`` (a node id)."""
    return sorted(client_url(info) for n, info in members.items()
                  if n != exclude and info.get("state") == "active"
                  and not info.get("lame_duck") and info.get("nats_port"))


def slots_per_node(state: ClusterState) -> dict[str, int]:
    counts = {n: 0 for n in state.members}
    for node, _ in state.slots:
        counts[node] = counts.get(node, 0) + 1
    return counts


def slots_per_shard(state: ClusterState) -> dict[str, list[int]]:
    counts = {n: [0] * int(info["shards"]) for n, info in state.members.items()}
    for node, shard in state.slots:
        per = counts.setdefault(node, [])
        if shard >= len(per):
            per.extend([0] * (shard + 1 - len(per)))
        per[shard] += 1
    return counts


def moves_touching(state: ClusterState, node_id: str) -> list[int]:
    return sorted(s for s, m in state.moves.items() if node_id in (m["from"][0], m["to"][0]))


# ---- validation ------------------------------------------------------------------------

def check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise StateError("bad_request", f"invalid node id {node_id!r}: 1-64 of letters, "
                                        "digits, '.', '_', '-', starting with a letter or digit")
    return node_id


def _int(info: Mapping[str, object], key: str, lo: int, hi: int | None = None) -> int:
    v = info.get(key)
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        limit = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise StateError("bad_request", f"member {key} must be an integer {limit}, got {v!r}")
    return v


def _member_info(info: object) -> MemberInfo:
    if not isinstance(info, dict):
        raise StateError("bad_request", "member info must be an object")
    advertise = info.get("advertise")
    if not isinstance(advertise, str) or not advertise or any(c.isspace() for c in advertise):
        raise StateError("bad_request", f"member advertise must be a host name, got {advertise!r}")
    joined_at = info.get("joined_at", 0)
    if not isinstance(joined_at, int | float) or isinstance(joined_at, bool):
        raise StateError("bad_request", "member joined_at must be a number")
    return {
        "advertise": advertise,
        "cluster_port": _int(info, "cluster_port", 1, 65535),
        "nats_port": _int(info, "nats_port", 0, 65535),
        "shards": _int(info, "shards", 1, 1024),
        "gateways": _int(info, "gateways", 0, 1024),
        "joined_at": joined_at,
        "state": "active",
    }


def _owner(v: object, what: str) -> ShardId:
    if (not isinstance(v, (list, tuple)) or len(v) != 2 or not isinstance(v[0], str)
            or type(v[1]) is not int):
        raise StateError("bad_request", f"move {what} must be [node_id, shard], got {v!r}")
    return (v[0], v[1])


def _is_shard_of(state: ClusterState, owner: ShardId) -> bool:
    info = state.members.get(owner[0])
    return info is not None and 0 <= owner[1] < info["shards"]


def _refs(refs: object) -> list[tuple[int, int]]:
    if not isinstance(refs, (list, tuple)):
        raise StateError("bad_request", "moves must be a list of [slot, id]")
    out: list[tuple[int, int]] = []
    for r in refs:
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or type(r[0]) is not int
                or type(r[1]) is not int):
            raise StateError("bad_request", f"move reference must be [slot, id], got {r!r}")
        out.append((r[0], r[1]))
    return out


def _bump(state: ClusterState, **changes: Any) -> ClusterState:
    return replace(state, version=state.version + 1, **changes)


def _need_bootstrap(state: ClusterState) -> None:
    if not state.bootstrapped:
        raise StateError("unavailable", "the cluster is not bootstrapped yet")


# ---- transitions -----------------------------------------------------------------------
# Each takes the state and keyword arguments and returns (new_state, result dict). When
# nothing changes it returns the same state object, and the version stays.

def bootstrap(state: ClusterState, *, cluster_id: str, node_id: str, info: object) -> Transition:
    """The first member: it owns every slot, spread over its shards the way a single node
    spreads them (slot % shards), so a lone node's data stays where it was."""
    check_node_id(node_id)
    info = _member_info(info)
    if not isinstance(cluster_id, str) or not cluster_id:
        raise StateError("bad_request", "cluster_id must be a non-empty string")
    if state.bootstrapped:
        if state.cluster_id == cluster_id and node_id in state.members:
            return state, {}
        raise StateError("exists", f"cluster {state.cluster_id} is already bootstrapped")
    n = info["shards"]
    return _bump(state, cluster_id=cluster_id, members={node_id: info},
                 slots=tuple((node_id, slot % n) for slot in range(NUM_SLOTS))), {}


def add_member(state: ClusterState, *, node_id: str, info: object) -> Transition:
    """Adds a member, or updates one that restarted with other ports or shard counts.
    A node that comes back with fewer shards leaves slots on shards it no longer has;
    ``plan_rebalance`` moves those first."""
    _need_bootstrap(state)
    check_node_id(node_id)
    info = _member_info(info)
    address = raft_address(info)
    other = state.node_at(address)
    if other is not None and other != node_id:
        raise StateError("exists", f"address {address} belongs to member {other}")
    old = state.members.get(node_id)
    if old is not None:
        if raft_address(old) != address:
            raise StateError("exists", f"node id {node_id} is taken by {raft_address(old)}")
        new = MemberInfo(**{**info, "joined_at": old["joined_at"], "state": old["state"]})
        if new == old:
            return state, {}
        info = new
    return _bump(state, members={**state.members, node_id: info}), {}


def set_leaving(state: ClusterState, *, node_id: str, leaving: bool = True) -> Transition:
    """A leaving member keeps serving its slots but receives none, and the rebalancer
    moves its slots away; ``remove_member`` then takes it out."""
    if node_id not in state.members:
        raise StateError("not_found", f"no member {node_id}")
    new: MemberState = "leaving" if leaving else "active"
    if state.members[node_id]["state"] == new:
        return state, {}
    if new == "leaving" and not any(
            n != node_id and i["state"] == "active" for n, i in state.members.items()):
        raise StateError("bad_request", "cannot drain the last active member")
    members = {**state.members, node_id: {**state.members[node_id], "state": new}}
    return _bump(state, members=members), {}


def set_lame_duck(state: ClusterState, *, node_id: str, lame_duck: bool = True) -> Transition:
    """A member in lame-duck mode is leaving for a while (a rolling restart): its client
    URL is no longer advertised, so clients it closes reconnect elsewhere. Cleared by the
    node itself once it serves again. Absent rather than false, so a member that never
    used it reads the same as in older states."""
    if node_id not in state.members:
        raise StateError("not_found", f"no member {node_id}")
    info = state.members[node_id]
    if bool(info.get("lame_duck")) == bool(lame_duck):
        return state, {}
    info = info.copy()
    if lame_duck:
        info["lame_duck"] = True
    else:
        del info["lame_duck"]
    return _bump(state, members={**state.members, node_id: info}), {}


def remove_member(state: ClusterState, *, node_id: str, force: bool = False) -> Transition:
    """Takes a member out. Without ``force`` it must own no slots and take part in no
    move. With ``force`` (the node is gone for good) its moves are dropped and its slots
    are handed to the others at once, without any copying: whatever it stored is lost."""
    if node_id not in state.members:
        return state, {}
    if len(state.members) == 1:
        raise StateError("bad_request", "cannot remove the last member")
    owned = sum(1 for n, _ in state.slots if n == node_id)
    moving = moves_touching(state, node_id)
    if (owned or moving) and not force:
        raise StateError("busy", f"{node_id} still owns {owned} slots and is in "
                                 f"{len(moving)} moves; drain it first (or force)")
    slots = list(state.slots)
    moves = dict(state.moves)
    reassigned = 0
    if force:
        for s in moving:
            del moves[s]
        tmp = replace(state, moves=moves,
                      members={**state.members,
                               node_id: {**state.members[node_id], "state": "leaving"}})
        for m in plan_rebalance(tmp, exclude=frozenset({node_id})):
            if m["from"][0] == node_id:
                slots[m["slot"]] = m["to"]
                reassigned += 1
        left = [s for s, (n, _) in enumerate(slots) if n == node_id]
        if left:
            # The plan can fall short when other moves target leaving members; the rest
            # go to the least-loaded active shards, still deterministically.
            targets = sorted((n, s) for n, i in state.members.items()
                             if n != node_id and i["state"] == "active"
                             for s in range(i["shards"]))
            if not targets:
                raise StateError("unavailable", f"no active member can take the slots of {node_id}")
            load = {o: 0 for o in targets}
            for o in slots:
                if o in load:
                    load[o] += 1
            for s in left:
                dst = min(targets, key=lambda o: (load[o], o))
                slots[s] = dst
                load[dst] += 1
                reassigned += 1
    members = {n: i for n, i in state.members.items() if n != node_id}
    queue_groups = {n: g for n, g in state.queue_groups.items() if n != node_id}
    return _bump(state, members=members, slots=tuple(slots), moves=moves,
                 queue_groups=queue_groups), {"reassigned": reassigned}


def start_moves(state: ClusterState, *, moves: object) -> Transition:
    """Starts moving slots (state ``copying``): the source keeps serving them while their
    mailboxes are copied. All or nothing: one invalid move refuses the whole batch.
    A move that is already under way exactly as asked is accepted and left alone."""
    _need_bootstrap(state)
    if not isinstance(moves, (list, tuple)) or len(moves) > MAX_MOVES_PER_OP:
        raise StateError("bad_request", f"moves must be a list of at most {MAX_MOVES_PER_OP}")
    new_id = state.version + 1
    started: list[tuple[int, ShardId, ShardId]] = []
    existing: list[list[int]] = []
    seen: set[int] = set()
    for m in moves:
        if not isinstance(m, dict):
            raise StateError("bad_request", "each move must be an object")
        slot = m.get("slot")
        if type(slot) is not int or not 0 <= slot < NUM_SLOTS:
            raise StateError("bad_request", f"invalid slot {slot!r}")
        if slot in seen:
            raise StateError("bad_request", f"slot {slot} appears twice")
        seen.add(slot)
        src, dst = _owner(m.get("from"), "from"), _owner(m.get("to"), "to")
        cur = state.moves.get(slot)
        if cur is not None:
            if cur["from"] == src and cur["to"] == dst:
                existing.append([slot, cur["id"]])
                continue
            raise StateError("busy", f"slot {slot} is already moving to {cur['to']}")
        if state.slots[slot] != src:
            raise StateError("conflict", f"slot {slot} is owned by {state.slots[slot]}, not {src}")
        if src == dst:
            raise StateError("bad_request", f"slot {slot}: source and target are the same")
        if not _is_shard_of(state, dst):
            raise StateError("not_found", f"slot {slot}: no shard {dst}")
        started.append((slot, src, dst))
    if not started:
        return state, {"started": existing}
    new_moves = dict(state.moves)
    for slot, src, dst in started:
        new_moves[slot] = {"id": new_id, "from": src, "to": dst, "state": "copying"}
    return _bump(state, moves=new_moves), {
        "started": existing + [[slot, new_id] for slot, _, _ in started]}


def set_moves_state(state: ClusterState, *, moves: object, move_state: str) -> Transition:
    """``flipping``: the source stops taking writes for these slots while the last of
    their data is copied. Unknown references (finished, aborted) are skipped."""
    if move_state not in MOVE_STATES:
        raise StateError("bad_request", f"move state must be one of {', '.join(MOVE_STATES)}")
    checked = cast(MoveState, move_state)
    new_moves, changed = dict(state.moves), 0
    for slot, mid in _refs(moves):
        cur = new_moves.get(slot)
        if cur is not None and cur["id"] == mid and cur["state"] != move_state:
            new_moves[slot] = {**cur, "state": checked}
            changed += 1
    if not changed:
        return state, {"changed": 0}
    return _bump(state, moves=new_moves), {"changed": changed}


def finish_moves(state: ClusterState, *, moves: object) -> Transition:
    """Flips ownership of each referenced slot to its target and ends the move."""
    slots, new_moves, done = list(state.slots), dict(state.moves), 0
    for slot, mid in _refs(moves):
        cur = new_moves.get(slot)
        if cur is None or cur["id"] != mid:
            continue
        if not _is_shard_of(state, cur["to"]):
            raise StateError("not_found", f"slot {slot}: target {cur['to']} is gone; abort it")
        slots[slot] = cur["to"]
        del new_moves[slot]
        done += 1
    if not done:
        return state, {"finished": 0}
    return _bump(state, slots=tuple(slots), moves=new_moves), {"finished": done}


def abort_moves(state: ClusterState, *, moves: object) -> Transition:
    """Ends moves without flipping: the source keeps the slots."""
    new_moves, done = dict(state.moves), 0
    for slot, mid in _refs(moves):
        cur = new_moves.get(slot)
        if cur is not None and cur["id"] == mid:
            del new_moves[slot]
            done += 1
    if not done:
        return state, {"aborted": 0}
    return _bump(state, moves=new_moves), {"aborted": done}


def _check_group(subject: object, queue: object) -> QueueGroup:
    if not isinstance(subject, str) or not subject or not isinstance(queue, str) or not queue:
        raise StateError("bad_request", "queue group needs a subject and a queue name")
    return subject, queue


def set_queue_groups(state: ClusterState, *, node_id: str, groups: Sequence[Sequence[object]]) -> Transition:
    """Replaces the (subject, queue) pairs that have members on a node. A full
    replacement is what a node sends after a restart, so nothing stale survives."""
    if node_id not in state.members:
        raise StateError("not_found", f"no member {node_id}")
    new = tuple(sorted({_check_group(*g) for g in groups}))
    if state.queue_groups.get(node_id, ()) == new:
        return state, {}
    qg = {**state.queue_groups, node_id: new}
    if not new:
        del qg[node_id]
    return _bump(state, queue_groups=qg), {}


def queue_group_add(state: ClusterState, *, node_id: str, subject: str, queue: str) -> Transition:
    cur = state.queue_groups.get(node_id, ())
    return set_queue_groups(state, node_id=node_id,
                            groups=list(cur) + [_check_group(subject, queue)])


def queue_group_remove(state: ClusterState, *, node_id: str, subject: str, queue: str) -> Transition:
    cur = state.queue_groups.get(node_id, ())
    g = _check_group(subject, queue)
    if node_id not in state.members:
        return state, {}
    return set_queue_groups(state, node_id=node_id, groups=[x for x in cur if x != g])


def noop(state: ClusterState) -> Transition:
    """Changes nothing; a write that measures the round trip through the leader."""
    return state, {}


# Each transition checks its own arguments (they come from the Raft log as decoded JSON).
OPS: dict[str, Callable[..., Transition]] = {
    "bootstrap": bootstrap,
    "add_member": add_member,
    "set_leaving": set_leaving,
    "set_lame_duck": set_lame_duck,
    "remove_member": remove_member,
    "start_moves": start_moves,
    "set_moves_state": set_moves_state,
    "finish_moves": finish_moves,
    "abort_moves": abort_moves,
    "set_queue_groups": set_queue_groups,
    "queue_group_add": queue_group_add,
    "queue_group_remove": queue_group_remove,
    "noop": noop,
}


def apply(state: ClusterState, op: str, args: object) -> Transition:
    """Applies one named operation: (new_state, result). Raises StateError."""
    fn = OPS.get(op)
    if fn is None:
        raise StateError("bad_request", f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise StateError("bad_request", "operation arguments must be an object")
    try:
        return fn(state, **args)
    except TypeError as e:  # missing or unexpected keyword: a caller's bug, not a crash
        raise StateError("bad_request", f"{op}: {e}") from None


# ---- planning --------------------------------------------------------------------------

def plan_rebalance(state: ClusterState, exclude: frozenset[str] = frozenset()) -> list[PlannedMove]:
    """Moves that spread the slots evenly over the shards of every active member not in
    ``exclude``, moving as few slots as possible. Deterministic.

    Each eligible shard ends with NUM_SLOTS // shards or one more. Slots owned by a
    leaving, excluded, removed member or by a shard its node no longer has must move.
    The shards that get the one extra are those holding most already, which is what
    makes the number of moves minimal. Slots in a move are counted at their target and
    never planned again.
    """
    if not state.bootstrapped:
        return []
    eligible = sorted((n, s) for n, info in state.members.items()
                      if info["state"] == "active" and n not in exclude
                      for s in range(info["shards"]))
    if not eligible:
        return []
    eligible_set = set(eligible)
    held: dict[ShardId, list[int]] = {o: [] for o in eligible}  # movable slots per shard
    pinned: dict[ShardId, int] = {o: 0 for o in eligible}
    orphans: list[int] = []
    for slot, owner in enumerate(state.slots):
        move = state.moves.get(slot)
        if move is not None:
            if move["to"] in eligible_set:
                pinned[move["to"]] += 1
            continue
        if owner in eligible_set:
            held[owner].append(slot)
        else:
            orphans.append(slot)
    count = {o: len(held[o]) + pinned[o] for o in eligible}
    base, extra = divmod(NUM_SLOTS, len(eligible))
    by_size = sorted(eligible, key=lambda o: (-count[o], o))
    quota = {o: base + (1 if i < extra else 0) for i, o in enumerate(by_size)}

    pool = list(orphans)
    for o in eligible:
        surplus = count[o] - quota[o]
        if surplus > 0:
            # shed from the top: keeps each shard's low slots, an arbitrary but stable rule
            pool.extend(held[o][-surplus:][::-1] if surplus <= len(held[o]) else held[o][::-1])
    deficit = {o: quota[o] - count[o] for o in eligible if quota[o] > count[o]}
    receivers = [o for o in eligible if o in deficit]
    # Round-robin over receivers spreads a batch of moves over all new shards at once
    # instead of filling one shard before the next.
    plan: list[PlannedMove] = []
    i = 0
    for slot in pool:
        if not receivers:
            break
        i %= len(receivers)
        dst = receivers[i]
        plan.append({"slot": slot, "from": state.slots[slot], "to": dst})
        deficit[dst] -= 1
        if deficit[dst] == 0:
            receivers.pop(i)
        else:
            i += 1
    return plan


def plan_drain(state: ClusterState, node_id: str) -> list[PlannedMove]:
    """Moves that take every slot off ``node_id``, keeping the rest even."""
    return plan_rebalance(state, exclude=frozenset({node_id}))


# ---- the snapshot file gateways read ---------------------------------------------------

def write_snapshot(path: str, state: ClusterState) -> None:
    """Atomically replaces ``path`` with the state as JSON: a reader sees the old or the
    new file, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_dict(), f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_snapshot(path: str) -> ClusterState:
    with open(path) as f:
        return ClusterState.from_dict(json.load(f))
