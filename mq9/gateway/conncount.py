"""Node-wide connection count shared by the gateway processes.

``max_connections`` is a node limit, but connections land on whichever gateway the kernel
picks. Each gateway writes its own count into its slot of a small memory-mapped file; the
sum is read on accept. Races between two simultaneous accepts can overshoot by at most one
connection per gateway, which is the price of not locking on the accept path.
"""

from __future__ import annotations

import mmap
import os
import struct

from mq9.config import Config

_SLOT = struct.Struct("<q")


class ConnCounter:
    def __init__(self, cfg: Config, index: int):
        n = cfg.gateway_count
        path = os.path.join(cfg.run_dir, "connections")
        os.makedirs(cfg.run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < n * _SLOT.size:
                os.ftruncate(fd, n * _SLOT.size)
            self.mm = mmap.mmap(fd, n * _SLOT.size)
        finally:
            os.close(fd)
        self.n = n
        self.offset = index * _SLOT.size
        self.set(0)

    def set(self, count: int) -> None:
        _SLOT.pack_into(self.mm, self.offset, count)

    def total(self) -> int:
        return sum(_SLOT.unpack_from(self.mm, i * _SLOT.size)[0] for i in range(self.n))

    def close(self) -> None:
        self.set(0)
        self.mm.close()
