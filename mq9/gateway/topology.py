"""Where things are, as seen by one gateway: which shard owns a mailbox, and where the
other gateways listen.

On a single node (no cluster, or before the metadata group has written its snapshot) the
answer is local: the slot map spreads slots over this node's shards and every peer is a
local gateway reached over ipc. In a cluster the answer comes from the metadata group's
snapshot file (``<data_dir>/cluster/state.json``), re-read when it changes; peers and
shards on other nodes are reached over TCP at ports derived from their ``cluster_port``
(``mq9.endpoints``).
"""

from __future__ import annotations

import os
from typing import Any

from mq9 import endpoints
from mq9.cluster.slots import ShardId, SlotMap, slot_of
from mq9.config import Config

# A member's entry in the metadata group's snapshot, as JSON gives it (``cluster/state.py``):
# advertise, cluster_port, shards, gateways, ...
MemberInfo = dict[str, Any]


def gateway_id(node: str, index: int) -> str:
    return f"{node}/{index}"


class Topology:
    def __init__(self, cfg: Config, node_id: str):
        self.cfg = cfg
        self.node = node_id
        self.version = -1
        self._local = SlotMap(cfg.shards)
        self.owners: list[ShardId] | None = None  # None: single node, use _local
        self.members: dict[str, MemberInfo] = {}
        self.path = os.path.join(cfg.data_dir, "cluster", "state.json")
        self._mtime = 0.0

    # ---- lookups -------------------------------------------------------------------

    def owner(self, mail_id: str) -> ShardId:
        if self.owners is None:
            return (self.node, self._local.shard_for(mail_id))
        return self.owners[slot_of(mail_id)]

    def shard_endpoint(self, target: ShardId) -> str | None:
        node, shard = target
        if node == self.node:
            return endpoints.shard_endpoint(self.cfg, shard)
        info = self.members.get(node)
        if info is None:
            return None
        return endpoints.shard_tcp(info["advertise"], info["cluster_port"], shard)

    def gateways(self) -> dict[str, str]:
        """Every gateway of the cluster (this one included) -> its mesh endpoint."""
        out = {gateway_id(self.node, j): endpoints.gateway_endpoint(self.cfg, j)
               for j in range(self.cfg.gateway_count)}
        for node, info in self.members.items():
            if node == self.node:
                continue
            for j in range(int(info.get("gateways", 0))):
                out[gateway_id(node, j)] = endpoints.gateway_tcp(
                    info["advertise"], info["cluster_port"], int(info["shards"]), j)
        return out

    # ---- refresh -------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the snapshot if it changed; True if the topology is new."""
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._mtime:
            return False
        from mq9.cluster import state as st  # only gateways of clustered nodes need it

        try:
            snap = st.read_snapshot(self.path)
        except (OSError, ValueError, KeyError):
            return False  # a half-written file cannot happen (atomic replace); a bad one waits
        self._mtime = mtime
        if snap.version == self.version or not snap.slots:
            return False
        self.version = snap.version
        self.members = {n: dict(i) for n, i in snap.members.items()}
        self.owners = [(node, shard) for node, shard in snap.slots]
        return True
