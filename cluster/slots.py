"""mail_id -> slot -> shard.

The hash must never change: a mailbox's slot decides which RocksDB holds it, so a different
hash after an upgrade would orphan every stored message. CRC-32 (zlib) is stable across
Python versions and platforms, unlike the built-in ``hash``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

NUM_SLOTS = 4096

# One shard of the cluster: (node_id, shard index on that node). A slot's owner, a move's
# source or target, a socket's peer: everywhere a shard is named, it is named this way.
ShardId = tuple[str, int]


def slot_of(mail_id: str) -> int:
    return zlib.crc32(mail_id.encode()) % NUM_SLOTS


@dataclass
class SlotMap:
    """Which shard owns each slot.

    A single node spreads slots round-robin over its shards. The cluster issue replaces the
    table from the Raft group; everything else keeps asking ``shard_for``.
    """

    num_shards: int
    owners: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        if not self.owners:
            self.owners = [slot % self.num_shards for slot in range(NUM_SLOTS)]

    def shard_for(self, mail_id: str) -> int:
        return self.owners[slot_of(mail_id)]

    def slots_of(self, shard: int) -> list[int]:
        return [s for s, owner in enumerate(self.owners) if owner == shard]
