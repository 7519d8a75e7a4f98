"""node.json and state.json of one member (``local_files.py``)."""

from __future__ import annotations

import json

from mq9.cluster import state as st
from mq9.cluster.local_files import NodeFile, StateFileWriter, saved_node_id
from mq9.cluster.state import ClusterState

INFO = {"advertise": "127.0.0.1", "cluster_port": 7000, "nats_port": 4222, "shards": 2,
        "gateways": 1, "joined_at": 0}


def test_node_file_updates_merge_and_wipe_forgets(tmp_path):
    d = tmp_path / "cluster"
    f = NodeFile(str(d))
    assert f.read() == {} and saved_node_id(str(d)) is None
    f.replace({"node_id": "n1", "peers": []})
    f.update(peers=["127.0.0.1:7001"])
    assert json.loads((d / "node.json").read_text()) == {"node_id": "n1",
                                                          "peers": ["127.0.0.1:7001"]}
    assert NodeFile(str(d)).read() == f.content and saved_node_id(str(d)) == "n1"
    (d / "raft.journal").write_bytes(b"x")
    f.wipe()
    assert list(d.iterdir()) == [] and f.read() == {}


def test_state_file_holds_the_latest_bootstrapped_state(tmp_path):
    path = str(tmp_path / "state.json")
    box = {"s": ClusterState()}
    w = StateFileWriter(path, lambda: box["s"]).start()
    w.changed()
    box["s"], _ = st.apply(box["s"], "bootstrap", {"cluster_id": "c", "node_id": "n1",
                                                  "info": INFO})
    box["s"], _ = st.apply(box["s"], "queue_group_add", {"node_id": "n1", "subject": "a",
                                                        "queue": "q"})
    w.changed()
    w.close()  # writes whatever the thread had not written yet
    assert st.read_snapshot(path) == box["s"]


def test_an_empty_state_is_never_written(tmp_path):
    path = tmp_path / "state.json"
    w = StateFileWriter(str(path), ClusterState)
    w.write()
    w.close()
    assert not path.exists()
