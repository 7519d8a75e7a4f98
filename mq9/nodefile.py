"""``run_dir/node.json``: a running node's pid, ports and server_id (``wire.NodeInfo``).

Written once by the supervisor at start (atomically, so a reader never sees half of it);
the run dir is recreated at every start, so a file there belongs to the latest start.
"""

from __future__ import annotations

import base64
import os

import msgspec

from mq9.wire import NodeInfo

NAME = "node.json"


def path(run_dir: str) -> str:
    return os.path.join(run_dir, NAME)


def new_server_id() -> str:
    """Shaped like nats-server's (56 base32 characters starting with N), fresh per start."""
    return ("N" + base64.b32encode(os.urandom(35)).decode())[:56]


def write(run_dir: str, info: NodeInfo) -> None:
    tmp = path(run_dir) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(info))
    os.replace(tmp, path(run_dir))


def read(run_dir: str) -> NodeInfo | None:
    try:
        with open(path(run_dir), "rb") as f:
            return msgspec.json.decode(f.read(), type=NodeInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
