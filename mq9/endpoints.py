"""Where each process of a node listens for the others (ZeroMQ endpoints).

IPC socket paths are limited to ~107 bytes; a deep data dir falls back to a short path in the
system temp dir named by a hash of the data dir, so two nodes never share sockets.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from mq9.config import Config

_MAX_IPC_PATH = 100


def socket_dir(cfg: Config) -> str:
    path = cfg.run_dir
    if len(path) + len("/shard-000.ipc") <= _MAX_IPC_PATH:
        return path
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"mq9-{digest}")


def shard_endpoint(cfg: Config, index: int) -> str:
    return f"ipc://{socket_dir(cfg)}/shard-{index}.ipc"


def gateway_endpoint(cfg: Config, index: int) -> str:
    return f"ipc://{socket_dir(cfg)}/gw-{index}.ipc"


def metrics_dir(cfg: Config) -> str:
    return os.path.join(cfg.run_dir, "metrics")
