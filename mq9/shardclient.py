"""Requests to shards from the supervisor process (the slot mover, the operator's mailbox
list), on blocking ZeroMQ DEALER sockets: where a shard listens as seen from this node
(ipc here, TCP on another member), a socket dialled to it (CURVE over TCP), and the answer
to one request picked out of a frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zmq

from mq9 import curve, endpoints, wire
from mq9.cluster.slots import ShardId
from mq9.config import Config


def endpoint(cfg: Config, node_id: str, members: Mapping[str, Mapping[str, Any]], owner: ShardId) -> str:
    """Shard ``owner``'s endpoint for a process of node ``node_id``; ``members`` is the
    metadata group's member table (only read for another node's shard): a member's info
    as JSON gives it."""
    node, shard = owner
    if node == node_id:
        return endpoints.shard_endpoint(cfg, shard)
    info = members[node]
    return endpoints.shard_tcp(info["advertise"], info["cluster_port"], shard)


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], cfg: Config, address: str,
           identity: bytes | None = None) -> zmq.Socket[bytes]:
    """A DEALER connected to ``address``. Without ``identity`` ZeroMQ makes one up, so
    callers that come and go never take over each other's pipe at the shard's ROUTER."""
    s = ctx.socket(zmq.DEALER)
    try:
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        s.setsockopt(zmq.LINGER, 0)
        curve.connect(s, address, cfg.cluster_secret)
    except BaseException:
        s.close(linger=0)
        raise
    return s


def answer_in(frame: bytes, rid: int) -> wire.Answer | None:
    """The answer to request ``rid`` in a frame from a shard, or None."""
    for m in wire.decode_from_shard(frame):
        if isinstance(m, wire.ANSWERS) and m.rid == rid:
            return m
    return None


def name(owner: ShardId) -> str:
    return f"{owner[0]}/shard-{owner[1]}"
