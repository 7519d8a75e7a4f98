"""Fixtures that run real mq9 nodes (see nodeproc.py).

- ``node``: a fresh node per test (2 gateways, 2 shards, its own data dir and ports);
- ``shared_node``: one node for a whole test module, for tests that don't disturb it;
- ``node_factory``: ``node_factory(**flags)`` for nodes with other settings or several nodes;
- ``conns``: ``await conns(url, **kw)`` for nats-py connections closed at the end.

A failing test that used any of them gets the end of each node's log in its report. A node
that cannot start (our code does not import, a port is taken) fails the test: nothing here
skips.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import pytest

# importable as plain `nodeproc` from any test, whatever pytest's rootdir and import mode
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodeproc import Node  # noqa: E402


class NodeFactory:
    def __init__(self, base: Path):
        self.base = base
        self.nodes: list[Node] = []

    def __call__(self, start: bool = True, **kw) -> Node:
        node = Node(self.base / f"node{len(self.nodes)}", **kw)
        self.nodes.append(node)
        return node.start() if start else node

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def node(tmp_path) -> Node:
    n = Node(tmp_path / "node")
    try:
        n.start()
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory) -> Node:
    n = Node(tmp_path_factory.mktemp("shared-node"))
    try:
        n.start()
        yield n
    finally:
        n.close()


@pytest.fixture
def node_factory(tmp_path) -> NodeFactory:
    f = NodeFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
async def conns():
    """``await conns(url, **kw)`` -> a nats-py connection closed when the test ends
    (no reconnects unless asked for)."""
    made = []

    async def _connect(url, **kw):
        kw.setdefault("connect_timeout", 5.0)
        kw.setdefault("allow_reconnect", False)
        nc = await nats.connect(url, **kw)
        made.append(nc)
        return nc

    yield _connect
    for nc in made:
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), 5.0)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001, S110
                pass  # teardown of a connection already broken (nats-py may cancel its own reads)


def _nodes_used(item) -> list:
    found = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, NodeFactory):
            found.extend(value.nodes)
        elif hasattr(value, "log_tail") and hasattr(value, "log_path"):
            found.append(value)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for n in _nodes_used(item):
            report.sections.append((f"mq9 node log {n.log_path}", n.log_tail(200)))
    return report
