"""`mq9 cluster status` as text: what an operator reads."""

from __future__ import annotations

from mq9.cluster import admin


def test_status_text_shows_leaving_and_lame_duck_members():
    member = {"address": "h:6222", "nats_port": 4222, "shards": 2, "slots": 10,
              "slots_per_shard": [5, 5], "raft": "connected"}
    s = {"cluster_id": "c", "version": 3, "leader": "a", "leader_address": "h:6222",
         "term": 1, "commit_index": 9, "node_id": "a", "role": "leader", "has_quorum": True,
         "members": {"a": {**member, "state": "active"},
                     "b": {**member, "address": "i:6222", "state": "active", "lame_duck": True},
                     "c": {**member, "address": "j:6222", "state": "leaving"}},
         "raft_only": [], "moves_total": 0}
    rows = {line.split()[0]: line for line in admin.format_status(s).splitlines()
            if line[:2] in ("a ", "b ", "c ")}
    assert "active, lame duck" in rows["b"]
    assert "lame duck" not in rows["a"] and "leaving" in rows["c"]
