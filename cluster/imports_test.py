"""The dependency direction between ``mq9.cluster`` and the rest of ``mq9``, read from the
source (every ``import`` statement, those inside functions included):

- ``mq9.cluster.slots`` imports nothing of mq9: anything may use it;
- the metadata modules import nothing of mq9 outside ``mq9.cluster`` but ``mq9.log``;
- ``mq9.cluster.mover``, the bridge to the shards, also imports the wire format, the
  config and ``mq9.shardclient``;
- the data plane (gateways, shards, protocol, wire, config) imports from ``mq9.cluster``
  only ``slots`` and ``state`` (plain data), never the Raft group or the rebalancer;
- no import cycle passes through ``mq9.cluster``;
- only ``mq9.cluster.raft`` imports pysyncobj.

``python cluster/imports_test.py`` prints the edges between mq9.cluster and the rest.
"""

from __future__ import annotations

import ast
import os
import sys

import mq9

# The package's own folder, whichever way this file was reached (cluster/ or mq9/cluster/).
MQ9 = os.path.dirname(os.path.abspath(mq9.__file__))

PURE = {"mq9.cluster", "mq9.cluster.slots"}
METADATA_MAY_IMPORT = {"mq9.log"}
MOVER_MAY_IMPORT = {"mq9.log", "mq9.wire", "mq9.config", "mq9.shardclient"}
DATA_PLANE = ("mq9.gateway", "mq9.shard", "mq9.protocol", "mq9.wire", "mq9.subjects",
              "mq9.config", "mq9.endpoints", "mq9.curve", "mq9.log", "mq9.shardclient")
DATA_PLANE_MAY_IMPORT = {"mq9.cluster.slots", "mq9.cluster.state"}


def modules(root: str = MQ9) -> dict[str, str]:
    """Module name -> file, for every non-test module of mq9 (mq9/cluster is a link)."""
    out = {}
    base = os.path.dirname(root)
    for d, _dirs, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".py") and not f.endswith("_test.py"):
                name = os.path.relpath(os.path.join(d, f), base)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def graph(mods: dict[str, str]) -> dict[str, set[str]]:
    g = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # "from mq9 import log" imports the module mq9.log
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        g[name] = {d for d in deps if d in mods and d != name}
    return g


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def _in_cluster(name: str) -> bool:
    return name == "mq9.cluster" or name.startswith("mq9.cluster.")


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for m, deps in sorted(g.items()):
        outside = {d for d in deps if not _in_cluster(d)}
        if m in PURE:
            allowed: set[str] = set()
        elif m == "mq9.cluster.mover":
            allowed = MOVER_MAY_IMPORT
        elif _in_cluster(m):
            allowed = METADATA_MAY_IMPORT
        elif _in(m, DATA_PLANE):
            bad = {d for d in deps if _in_cluster(d)} - DATA_PLANE_MAY_IMPORT
            out += [f"{m} -> {d}: the data plane uses only slots and state" for d in sorted(bad)]
            continue
        else:
            continue
        out += [f"{m} -> {d}: not allowed from mq9.cluster" for d in sorted(outside - allowed)]
    for comp in cycles(g):
        if any(_in_cluster(m) for m in comp):
            out.append(f"import cycle through mq9.cluster: {sorted(comp)}")
    return out


def importers_of(package: str, mods: dict[str, str]) -> set[str]:
    out = set()
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            if any(n == package or n.startswith(package + ".") for n in names):
                out.add(name)
    return out


# ---- tests -------------------------------------------------------------------------------

def test_the_cluster_boundary_holds():
    assert violations(graph(modules())) == []


def test_only_the_adapter_touches_pysyncobj():
    assert importers_of("pysyncobj", modules()) == {"mq9.cluster.raft"}


def test_the_graph_sees_the_cluster_and_its_users():
    """Guards the reader: a walk that missed the mq9/cluster link would pass vacuously."""
    g = graph(modules())
    assert {"mq9.cluster.metadata", "mq9.cluster.mover", "mq9.cluster.slots"} <= set(g)
    assert "mq9.cluster.slots" in g["mq9.shard.batch"]
    assert "mq9.log" in g["mq9.cluster.metadata"]
    assert "mq9.wire" in g["mq9.cluster.mover"]


def test_a_cycle_or_a_wrong_direction_is_reported():
    g = {"mq9.cluster.state": {"mq9.gateway.server"}, "mq9.gateway.server": {"mq9.cluster.state"},
         "mq9.shard.mailbox": {"mq9.cluster.metadata"}, "mq9.cluster.metadata": set()}
    found = violations(g)
    assert any("cycle" in v and "mq9.gateway.server" in v for v in found)
    assert "mq9.cluster.state -> mq9.gateway.server: not allowed from mq9.cluster" in found
    assert any(v.startswith("mq9.shard.mailbox -> mq9.cluster.metadata") for v in found)


if __name__ == "__main__":
    g = graph(modules())
    for m in sorted(g):
        for d in sorted(g[m]):
            if _in_cluster(m) != _in_cluster(d):
                print(f"{m} -> {d}")
    problems = violations(g)
    print("\n".join(problems) or "boundary ok", file=sys.stderr)
    sys.exit(1 if problems else 0)
