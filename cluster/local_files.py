"""A member's own files in ``<data_dir>/cluster/`` (pysyncobj's journal and dump are
``raft.py``'s):

  node.json   who this node is and its Raft peers: a restart without ``--join`` needs the
              peer list before it can hear from anyone; also the cluster id and whether the
              node is joining or was removed
  state.json  the latest ClusterState as JSON, for gateways (``state.read_snapshot``)
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from typing import TypedDict, Unpack, cast

from mq9 import log
from mq9.cluster import state as st
from mq9.cluster.state import ClusterState

NODE_FILE = "node.json"
STATE_FILE = "state.json"


class NodeRecord(TypedDict, total=False):
    """node.json: every key may be missing from an older or half-set-up file."""

    node_id: str
    address: str  # host:cluster_port, the Raft address
    cluster_id: str
    peers: list[str]  # the other Raft members' addresses
    joining: bool
    removed: bool


def saved_node_id(directory: str) -> str | None:
    """The node id recorded in ``directory``/node.json, if any."""
    try:
        with open(os.path.join(directory, NODE_FILE)) as f:
            node_id = json.load(f)["node_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return node_id if isinstance(node_id, str) else None


class NodeFile:
    """node.json, written whole and atomically (fsync, rename) from two threads (the
    caller's and pysyncobj's): ``update`` merges into what this process wrote last."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, NODE_FILE)
        self.content: NodeRecord = {}
        self._lock = threading.Lock()

    def read(self) -> NodeRecord:
        """What is on disk ({} without a file). Raises OSError or ValueError."""
        try:
            with open(self.path) as f:
                content = json.load(f)
            if not isinstance(content, dict):
                raise ValueError("node.json must hold an object")
            return cast(NodeRecord, content)
        except FileNotFoundError:
            return {}

    def replace(self, content: NodeRecord) -> None:
        with self._lock:
            self.content = content.copy()
            self._write()

    def update(self, **changes: Unpack[NodeRecord]) -> None:
        with self._lock:
            self.content.update(changes)
            self._write()

    def _write(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.content, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def wipe(self) -> None:
        """Forgets the whole metadata directory (a removed member joining again)."""
        with self._lock:
            self.content = {}
            shutil.rmtree(self.directory, ignore_errors=True)
            os.makedirs(self.directory, exist_ok=True)


class StateFileWriter:
    """Keeps state.json at the latest bootstrapped state: off pysyncobj's thread and at
    most every 50 ms, since a rebalance applies many changes per second and readers only
    need the latest. ``changed()`` wakes it; ``close()`` writes the last version."""

    def __init__(self, path: str, current: Callable[[], ClusterState]):
        self.path = path
        self._current = current
        self._version = -1
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mq9-metadata-snapshot",
                                        daemon=True)

    def start(self) -> StateFileWriter:
        self._thread.start()
        return self

    def changed(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self.write()
            self._closed.wait(0.05)

    def write(self) -> None:
        s = self._current()
        if s.version == self._version or not s.bootstrapped:
            return
        try:
            st.write_snapshot(self.path, s)
            self._version = s.version
        except OSError:
            log.exception("metadata_snapshot_write_failed", path=self.path)

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.write()
