"""The slot mover: copies the mailboxes of moving slots from one shard to another.

The data half of a move, beside the ``Rebalancer`` (``rebalance.py``) that plans moves and
drives it: in the supervisor process, on the rebalancer's thread, with blocking ZeroMQ
DEALER sockets (one per shard it talks to, ipc on this node, TCP to others). For a batch of
moves:

    copy:   Export pages from each source, Import into each target (reset on the first
            page, so a repeated copy overwrites); the source keeps serving meanwhile.
    flip:   Freeze the slots on the source (its later ops answer ``moved``; gateways retry
            at the new owner once the slot map flips), export again, import again.
    finish: after ownership flipped in Raft, Drop the data on the source.

If flip fails, the source is unfrozen (an empty Import with ``done``) and the Rebalancer
aborts the batch: the source keeps the slots and nothing was lost.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from typing import Any, Protocol

import zmq

from mq9 import log, shardclient, wire
from mq9.cluster.slots import ShardId
from mq9.cluster.state import ClusterState, SlotMove
from mq9.config import Config
from mq9.shardclient import name as _name


class MoveError(Exception):
    pass


class Group(Protocol):
    """What the mover reads of the metadata group: who this node is, where shards are."""

    @property
    def node_id(self) -> str: ...

    def snapshot(self) -> ClusterState: ...


# A shard's request the mover sends; each is answered by a ``wire.Result``.
MoverOp = wire.Export | wire.Import | wire.Freeze | wire.Drop


class ShardMover:
    def __init__(self, cfg: Config, group: Group, timeout: float = 30.0, settle: float = 0.2):
        self.cfg = cfg
        self.settle = settle
        self.group = group
        self.timeout_ms = int(timeout * 1000)
        self.ctx = zmq.Context()
        self.socks: dict[ShardId, zmq.Socket[bytes]] = {}
        self.rids = itertools.count(1)
        self.log = log.bind(node=group.node_id)

    # ---- Rebalancer's mover protocol ---------------------------------------------------

    def copy(self, moves: list[SlotMove]) -> None:
        for (src, dst), slots in _by_pair(moves).items():
            n = self._transfer(src, dst, slots)
            self.log.info("slot_copy", source=_name(src), target=_name(dst), slots=len(slots), records=n)

    def flip(self, moves: list[SlotMove]) -> None:
        pairs = _by_pair(moves)
        inflight = 0
        for (src, _dst), slots in pairs.items():
            inflight += self._call(src, wire.Freeze(rid=next(self.rids), slots=slots)).get("inflight", 0)
        if inflight:
            # Messages were on their way to subscribers: give the gateways' Delivered
            # reports a moment to reach the frozen source, so the final export marks them
            # delivered instead of handing them to the new owner to deliver again.
            time.sleep(self.settle)
        for (src, dst), slots in pairs.items():
            try:
                n = self._transfer(src, dst, slots)
            except Exception:
                # Give every frozen slot back to its source before the batch is aborted.
                for (s, _d), sl in pairs.items():
                    self._call(s, wire.Import(rid=next(self.rids), slots=sl, pairs=[], done=True))
                raise
            self.log.info("slot_flip", source=_name(src), target=_name(dst), slots=len(slots),
                          records=n, inflight=inflight)

    def finish(self, moves: list[SlotMove]) -> None:
        for (src, _dst), slots in _by_pair(moves).items():
            self._call(src, wire.Drop(rid=next(self.rids), slots=slots))

    # ---- plumbing ------------------------------------------------------------------------

    def _transfer(self, src: ShardId, dst: ShardId, slots: list[int]) -> int:
        after = None
        first = True
        count = 0
        while True:
            page = self._call(src, wire.Export(rid=next(self.rids), slots=slots, after=after))
            pairs = [(bytes(k), bytes(v)) for k, v in page.get("pairs", ())]
            after = page.get("next")
            last = after is None
            self._call(dst, wire.Import(rid=next(self.rids), slots=slots, pairs=pairs,
                                        reset=first, done=last))
            count += len(pairs)
            first = False
            if last:
                return count

    def _sock(self, owner: ShardId) -> zmq.Socket[bytes]:
        s = self.socks.get(owner)
        if s is None:
            address = shardclient.endpoint(self.cfg, self.group.node_id,
                                           self.group.snapshot().members, owner)
            s = shardclient.dealer(self.ctx, self.cfg, address,
                                   identity=f"mover-{self.group.node_id}".encode())
            self.socks[owner] = s
        return s

    def _call(self, owner: ShardId, op: MoverOp) -> dict[str, Any]:
        s = self._sock(owner)
        s.send(wire.encode([op]))
        while True:
            if not s.poll(self.timeout_ms):
                # The socket may hold a late answer now: start afresh next time.
                self.socks.pop(owner).close(linger=0)
                raise MoveError(f"shard {_name(owner)} did not answer {type(op).__name__}")
            m = shardclient.answer_in(s.recv(), op.rid)
            if m is not None:
                if not isinstance(m, wire.Result):  # the shard answers a move op only so
                    raise MoveError(f"shard {_name(owner)} answered {type(op).__name__} "
                                    f"with {type(m).__name__}")
                if m.code:
                    raise MoveError(f"shard {_name(owner)}: {type(op).__name__}: {m.code}: {m.error}")
                return m.data or {}

    def close(self) -> None:
        for s in self.socks.values():
            s.close(linger=0)
        self.ctx.term()


def _by_pair(moves: list[SlotMove]) -> dict[tuple[ShardId, ShardId], list[int]]:
    out: dict[tuple[ShardId, ShardId], list[int]] = defaultdict(list)
    for m in moves:
        src, dst = m["from"], m["to"]
        # a tuple even if a move's ends arrived as JSON lists
        out[((src[0], src[1]), (dst[0], dst[1]))].append(int(m["slot"]))
    return out
