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


# ---- TCP endpoints between nodes -------------------------------------------------------
# A node's data ports sit right above its --cluster-port (the metadata group's Raft port):
# shard i at cluster_port + 1 + i, gateway j after the shards. Peers derive them from the
# member record (advertise, cluster_port, shards) without another lookup.

def shard_tcp_port(cluster_port: int, index: int) -> int:
    return cluster_port + 1 + index


def gateway_tcp_port(cluster_port: int, shards: int, index: int) -> int:
    return cluster_port + 1 + shards + index


def shard_tcp(host: str, cluster_port: int, index: int) -> str:
    return f"tcp://{host}:{shard_tcp_port(cluster_port, index)}"


def gateway_tcp(host: str, cluster_port: int, shards: int, index: int) -> str:
    return f"tcp://{host}:{gateway_tcp_port(cluster_port, shards, index)}"
