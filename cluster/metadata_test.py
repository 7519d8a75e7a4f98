"""MetadataGroup in one process: lifecycle, writes, callbacks, files, a two-member join.
The multi-process scenario (kill -9, restarts, removal) is in tests/test_metadata_group.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from mq9.cluster import state as st
from mq9.cluster.control import ControlError, call
from mq9.cluster.metadata import ClusterError, MetadataGroup, RaftTiming, default_node_id
from mq9.cluster.slots import NUM_SLOTS
from mq9.cluster.state import StateError


def qadd(g: MetadataGroup, subject: str, queue: str) -> dict:
    return g.write("queue_group_add", {"node_id": g.node_id, "subject": subject, "queue": queue})


def refs_of(refs) -> dict:
    return {"moves": [list(r) for r in refs]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def groups():
    made = []

    def make(node_id, data_dir, port=None, **kw):
        g = MetadataGroup(node_id, f"127.0.0.1:{port or free_port()}", data_dir=str(data_dir),
                          timing=RaftTiming.fast(), **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_single_member_bootstraps_and_writes(groups, tmp_path):
    g = groups("n1", tmp_path, shards=3).open(timeout=10)
    s = g.snapshot()
    assert s.bootstrapped and list(s.members) == ["n1"] and len(s.slots) == NUM_SLOTS
    assert g.is_leader() and g.leader() == "n1" and g.term() >= 1 and g.is_ready()
    seen = []
    g.on_change(lambda state, op: seen.append((op, state.version)))
    res = qadd(g, "jobs.*", "workers")
    assert res["ok"] and seen == [("queue_group_add", res["version"])]
    with pytest.raises(StateError) as e:
        g.write("add_member", {"node_id": "n1", "info": {
            "advertise": "10.0.0.9", "cluster_port": 1, "nats_port": 1, "shards": 1,
            "gateways": 1, "joined_at": 0}})
    assert e.value.code == "exists"
    assert g.write("noop")["ok"] and len(seen) == 1  # a no-op changes nothing, calls nobody
    status = g.status()
    assert status["members"]["n1"]["slots"] == NUM_SLOTS
    assert status["members"]["n1"]["slots_per_shard"] == [1366, 1365, 1365]
    assert status["role"] == "leader" and status["raft_members"] == [g.address]


def test_writes_are_refused_on_pysyncobj_thread(groups, tmp_path):
    g = groups("n1", tmp_path).open(timeout=10)
    errors = []

    def bad(state, op):
        try:
            g.write("noop", timeout=1)
        except RuntimeError as e:
            errors.append(e)

    g.on_change(bad)
    qadd(g, "a", "q")
    assert errors and "pysyncobj" in str(errors[0])


def test_restart_from_data_dir_keeps_state_and_files(groups, tmp_path):
    port = free_port()
    g = groups("n1", tmp_path, port=port).open(timeout=10)
    qadd(g, "x", "q")
    version, cid = g.snapshot().version, g.snapshot().cluster_id
    g.close()
    files = sorted(os.listdir(tmp_path / "cluster"))
    assert {"node.json", "raft.journal", "state.json"} <= set(files)
    assert st.read_snapshot(str(tmp_path / "cluster" / "state.json")).version == version
    node = json.loads((tmp_path / "cluster" / "node.json").read_text())
    assert node["node_id"] == "n1" and node["cluster_id"] == cid and not node["joining"]
    assert default_node_id(str(tmp_path)) == "n1"

    g2 = groups("n1", tmp_path, port=port).open(timeout=10)
    assert g2.snapshot().version == version and g2.snapshot().cluster_id == cid
    assert g2.snapshot().queue_groups == {"n1": (("x", "q"),)}
    g2.close()
    # the same data dir under another id or address is refused
    with pytest.raises(ClusterError):
        groups("other", tmp_path, port=port).start()
    with pytest.raises(ClusterError):
        groups("n1", tmp_path).start()


def test_log_compaction_snapshot_restores(groups, tmp_path):
    """pysyncobj's full dump holds our state as a dict; a restart loads it."""
    port = free_port()
    g = groups("n1", tmp_path, port=port).open(timeout=10)
    for i in range(5):
        qadd(g, f"s{i}", "q")
    g.raft.compact()
    assert _wait(lambda: os.path.exists(tmp_path / "cluster" / "raft.dump"), 5)
    qadd(g, "after", "q")
    want = g.snapshot()
    g.close()
    modules = _pickled_modules(tmp_path / "cluster" / "raft.dump")
    assert "pysyncobj.node" in modules  # the reader does see classes (pysyncobj's own)
    assert not {m for m in modules if m.split(".")[0] in ("mq9", "cluster")}
    with open(tmp_path / "cluster" / "raft.journal", "rb") as f:
        assert b"mq9" not in f.read()  # entries are (method number, (op, args), {})
    g2 = groups("n1", tmp_path, port=port).open(timeout=10)
    assert g2.snapshot() == want


def _pickled_modules(path) -> set[str]:
    """The modules of every class in pysyncobj's dump: a class of ours in it would make
    the dump unreadable once that class moves."""
    import gzip
    import pickle

    seen = set()

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(module)
            return super().find_class(module, name)

    with gzip.open(path) as f:
        Reader(f).load()
    return seen


def test_join_in_process_and_forwarded_writes(groups, tmp_path):
    a = groups("a", tmp_path / "a").open(timeout=10)
    b = groups("b", tmp_path / "b", shards=2)
    b.join(a.address, timeout=15)
    assert set(b.snapshot().members) == {"a", "b"}
    assert b.raft_members() == sorted([a.address, b.address])
    # b is a follower: its write goes through a
    assert b.leader() == "a"
    qadd(b, "q.>", "g")
    assert a.wait_for(lambda s: s.queue_groups.get("b") == (("q.>", "g"),), 5)
    # no election happened because of the join
    assert a.term() == 1 and b.term() == 1
    # the control channel answers on the Raft port
    s = call(b.address, "status")
    assert s["leader"] == "a" and set(s["members"]) == {"a", "b"}
    snap = call(a.address, "snapshot")["state"]
    assert st.ClusterState.from_dict(snap) == a.snapshot()
    with pytest.raises(ControlError) as e:
        call(a.address, "write", {"op": "remove_member", "args": {"node_id": "a"}})
    assert e.value.code == "busy"
    with pytest.raises(ControlError) as e:
        call(a.address, "no_such_thing")
    assert e.value.code == "bad_request"


def test_join_refuses_a_taken_node_id(groups, tmp_path):
    a = groups("a", tmp_path / "a").open(timeout=10)
    dup = groups("a", tmp_path / "dup")
    with pytest.raises(ClusterError) as e:
        dup.join(a.address, timeout=5)
    assert e.value.code == "exists"


def test_join_an_unreachable_seed_times_out(groups, tmp_path):
    g = groups("x", tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        g.join(f"127.0.0.1:{free_port()}", timeout=1.5)
    assert e.value.code == "unreachable"
    assert time.monotonic() - t0 < 5


def test_moves_through_the_group(groups, tmp_path):
    a = groups("a", tmp_path / "a").open(timeout=10)
    b = groups("b", tmp_path / "b")
    b.join(a.address, timeout=15)
    plan = st.plan_rebalance(a.snapshot())
    assert len(plan) == NUM_SLOTS // 2
    moves = [{"slot": m["slot"], "from": list(m["from"]), "to": list(m["to"])} for m in plan[:10]]
    refs = a.write("start_moves", {"moves": moves})["started"]
    assert len(a.snapshot().moves) == 10
    assert b.wait_for(lambda s: len(s.moves) == 10, 5)
    assert b.status()["moves_total"] == 10
    a.write("set_moves_state", {**refs_of(refs), "move_state": "flipping"})
    b.write("finish_moves", refs_of(refs[:5]))  # from the follower
    a.write("abort_moves", refs_of(refs[5:]))
    s = a.snapshot()
    assert not s.moves and st.slots_per_node(s)["b"] == 5


def _wait(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_started_from_a_short_lived_thread_keeps_running(groups, tmp_path):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("g", groups("n1", tmp_path).open(timeout=10)))
    t.start()
    t.join()
    time.sleep(0.5)  # pysyncobj would have stopped ticking once that thread ended
    assert box["g"].write("noop", timeout=3)["ok"]


def test_cluster_secret(groups, tmp_path):
    """With a secret, Raft and control traffic are encrypted and authenticated (pysyncobj
    uses Fernet from the 'cryptography' package)."""
    a = groups("a", tmp_path / "a", password="s3cret").open(timeout=10)
    b = groups("b", tmp_path / "b", password="s3cret")
    b.join(a.address, timeout=15)
    assert set(b.snapshot().members) == {"a", "b"}
    assert call(a.address, "status", password="s3cret")["leader"] == "a"
    for wrong in (None, "guess"):
        with pytest.raises(ControlError) as e:
            call(a.address, "status", password=wrong, timeout=2)
        assert e.value.code == "unauthenticated" and "cluster secret" in str(e.value)
    intruder = groups("c", tmp_path / "c")
    with pytest.raises(ClusterError):
        intruder.join(a.address, timeout=2)
    assert set(a.snapshot().members) == {"a", "b"}


def test_join_naming_itself_bootstraps(groups, tmp_path):
    port = free_port()
    g = groups("solo", tmp_path, port=port).open(join=f"localhost:{port}", timeout=10)
    assert g.snapshot().bootstrapped and g.is_leader()


def test_from_config(tmp_path):
    from mq9 import config
    from mq9.cluster.metadata import from_config

    cfg = config.Config(host="127.0.0.1", port=4333, cluster_port=free_port(),
                        data_dir=str(tmp_path), shards=3, gateways=2)
    g = from_config(cfg, node_id="x")
    assert g.address == f"127.0.0.1:{cfg.cluster_port}" and g.dir == str(tmp_path / "cluster")
    assert g.member_info == {"advertise": "127.0.0.1", "cluster_port": cfg.cluster_port,
                             "nats_port": 4333, "shards": 3, "gateways": 2}
    with pytest.raises(ClusterError):
        from_config(config.Config(cluster_port=0, data_dir=str(tmp_path)))


def test_removed_member_stays_out_unless_rejoin(groups, tmp_path):
    a = groups("a", tmp_path / "a").open(timeout=10)
    port = free_port()
    b = groups("b", tmp_path / "b", port=port).open(join=a.address, timeout=15)
    a.write("remove_member", {"node_id": "b", "force": True})
    assert b.wait_for(lambda s: "b" not in s.members, 5) and b.removed
    a.remove_raft_node(b.address)
    b.close()
    # restarted with the same --join, as a StatefulSet does: refused, nothing changes
    again = groups("b", tmp_path / "b", port=port)
    with pytest.raises(ClusterError) as e:
        again.open(join=a.address, timeout=5)
    assert e.value.code == "removed" and "--rejoin" in str(e.value)
    assert set(a.snapshot().members) == {"a"} and a.raft_members() == [a.address]
    # asked for explicitly: wiped and joined again (the seed comes from its saved peers)
    back = groups("b", tmp_path / "b", port=port).open(timeout=15, rejoin=True)
    assert set(back.snapshot().members) == {"a", "b"}
    assert not json.load(open(tmp_path / "b" / "cluster" / "node.json"))["removed"]


def test_member_removed_while_down_stays_out(groups, tmp_path):
    a = groups("a", tmp_path / "a").open(timeout=10)
    bport = free_port()
    b = groups("b", tmp_path / "b", port=bport).open(join=a.address, timeout=15)
    port = free_port()
    c = groups("c", tmp_path / "c", port=port).open(join=a.address, timeout=15)
    c.close()  # down, then taken out for good by the others
    a.write("remove_member", {"node_id": "c", "force": True})
    a.remove_raft_node(c.address)
    assert b.wait_for(lambda s: "c" not in s.members, 5)
    with pytest.raises(ClusterError) as e:
        groups("c", tmp_path / "c", port=port).open(timeout=10)
    assert e.value.code == "removed" and "while it was down" in str(e.value)
    assert json.load(open(tmp_path / "c" / "cluster" / "node.json"))["removed"]
    assert sorted(a.raft_members()) == sorted([a.address, b.address])
    # An ordinary restart of a member that is still one is not affected.
    b.close()
    b = groups("b", tmp_path / "b", port=bport).open(timeout=10)
    assert not b.removed and set(b.snapshot().members) == {"a", "b"}
