"""Pure tests of the replicated state: transitions, planning, serialisation. No Raft."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from mq9.cluster import state as st
from mq9.cluster.slots import NUM_SLOTS, SlotMap
from mq9.cluster.state import ClusterState, StateError


def info(host="127.0.0.1", port=6222, shards=2, **kw):
    return {"advertise": host, "cluster_port": port, "nats_port": 4222, "shards": shards,
            "gateways": 2, "joined_at": 1.0, **kw}


def apply(s, op, **args):
    return st.apply(s, op, args)[0]


def boot(shards=2):
    return apply(ClusterState(), "bootstrap", cluster_id="c1", node_id="n1",
                 info=info(shards=shards))


def run_plan(s, plan):
    """Carries a plan out the way the rebalancer does, in batches."""
    for i in range(0, len(plan), st.MAX_MOVES_PER_OP):
        batch = plan[i:i + st.MAX_MOVES_PER_OP]
        s, res = st.apply(s, "start_moves", {"moves": batch})
        s = apply(s, "set_moves_state", moves=res["started"], move_state="flipping")
        s = apply(s, "finish_moves", moves=res["started"])
    return s


def per_shard(s):
    return Counter(s.slots)


# ---- bootstrap and members -------------------------------------------------------------

def test_bootstrap_keeps_the_single_node_layout():
    s = boot(shards=3)
    assert s.version == 1 and s.cluster_id == "c1"
    single = SlotMap(3)
    assert [shard for _, shard in s.slots] == single.owners
    assert {n for n, _ in s.slots} == {"n1"}
    assert s.members["n1"]["state"] == "active"
    # idempotent for the same cluster, refused for another
    assert apply(s, "bootstrap", cluster_id="c1", node_id="n1", info=info(shards=3)) is s
    with pytest.raises(StateError) as e:
        apply(s, "bootstrap", cluster_id="c2", node_id="x", info=info())
    assert e.value.code == "exists"


def test_writes_before_bootstrap_are_refused():
    with pytest.raises(StateError) as e:
        apply(ClusterState(), "add_member", node_id="n2", info=info(port=6223))
    assert e.value.code == "unavailable"


def test_add_member_validates_and_is_idempotent():
    s = boot()
    s2 = apply(s, "add_member", node_id="n2", info=info(port=6223))
    assert s2.version == s.version + 1 and "n2" in s2.members
    assert apply(s2, "add_member", node_id="n2", info=info(port=6223)) is s2
    # a restart with more shards updates the record but keeps joined_at
    s3 = apply(s2, "add_member", node_id="n2", info=info(port=6223, shards=4, joined_at=9.0))
    assert s3.members["n2"]["shards"] == 4 and s3.members["n2"]["joined_at"] == 1.0
    for bad in ({"node_id": "n3", "info": info(port=6223)},        # address of n2
                {"node_id": "n2", "info": info(port=6299)},        # id of n2, other address
                {"node_id": "bad id", "info": info(port=6300)},
                {"node_id": "n4", "info": info(port=0)},
                {"node_id": "n4", "info": info(port=6301, shards=0)},
                {"node_id": "n4", "info": {**info(port=6302), "advertise": ""}},
                {"node_id": "n4", "info": "nope"}):
        with pytest.raises(StateError):
            apply(s3, "add_member", **bad)


def test_unknown_operation_and_bad_arguments_are_state_errors():
    s = boot()
    with pytest.raises(StateError) as e:
        st.apply(s, "drop_everything", {})
    assert e.value.code == "bad_request"
    with pytest.raises(StateError):
        st.apply(s, "add_member", {"node_id": "n2"})  # info missing
    with pytest.raises(StateError):
        st.apply(s, "start_moves", {"moves": [{"slot": NUM_SLOTS, "from": ["n1", 0],
                                               "to": ["n1", 1]}]})


# ---- planning --------------------------------------------------------------------------

def test_one_member_needs_no_moves():
    assert st.plan_rebalance(boot()) == []
    assert st.plan_rebalance(ClusterState()) == []


def test_second_node_gets_half_the_slots_with_the_fewest_moves():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    plan = st.plan_rebalance(s)
    assert len(plan) == NUM_SLOTS // 2
    assert all(m["from"][0] == "n1" and m["to"][0] == "n2" for m in plan)
    assert plan == st.plan_rebalance(s)  # deterministic
    s = run_plan(s, plan)
    assert set(per_shard(s).values()) == {NUM_SLOTS // 4}
    assert st.plan_rebalance(s) == []


def test_uneven_shard_counts_spread_per_shard():
    s = boot(shards=2)
    s = apply(s, "add_member", node_id="n2", info=info(port=6223, shards=3))
    s = apply(s, "add_member", node_id="n3", info=info(port=6224, shards=1))
    s = run_plan(s, st.plan_rebalance(s))
    counts = per_shard(s)
    assert len(counts) == 6
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == NUM_SLOTS
    per_node = st.slots_per_node(s)
    for node, shards in (("n1", 2), ("n2", 3), ("n3", 1)):
        assert 682 * shards <= per_node[node] <= 683 * shards


def test_plan_does_not_depend_on_member_insertion_order():
    a = boot()
    a = apply(a, "add_member", node_id="n2", info=info(port=6223))
    a = apply(a, "add_member", node_id="n3", info=info(port=6224))
    b = ClusterState(cluster_id=a.cluster_id, version=a.version,
                     members=dict(reversed(list(a.members.items()))), slots=a.slots)
    assert st.plan_rebalance(a) == st.plan_rebalance(b)


def _minimal_moves(s: ClusterState) -> int:
    """Brute force: for every choice of which shards get the extra slot, the moves that
    choice forces; the best of them."""
    eligible = sorted((n, sh) for n, i in s.members.items() if i["state"] == "active"
                      for sh in range(i["shards"]))
    counts = Counter(s.slots)
    orphans = sum(c for o, c in counts.items() if o not in set(eligible))
    base, extra = divmod(NUM_SLOTS, len(eligible))
    best = None
    for plus in itertools.combinations(range(len(eligible)), extra):
        plus = set(plus)
        shed = sum(max(0, counts.get(o, 0) - (base + (i in plus))) for i, o in enumerate(eligible))
        best = shed if best is None else min(best, shed)
    return orphans + best


@pytest.mark.parametrize("seed", range(40))
def test_plan_is_even_and_minimal_on_random_states(seed):
    rnd = random.Random(seed)
    n_nodes = rnd.randint(1, 4)
    members = {f"n{i}": {**info(port=7000 + i, shards=rnd.randint(1, 3)), "state": "active"}
               for i in range(n_nodes)}
    # some slots on a departed node, others randomly placed (even skewed)
    owners = [(f"n{i}", sh) for i in range(n_nodes) for sh in range(members[f"n{i}"]["shards"])]
    weights = [rnd.random() ** 3 for _ in owners]
    slots = tuple(("gone", 0) if rnd.random() < 0.05 else rnd.choices(owners, weights)[0]
                  for _ in range(NUM_SLOTS))
    if rnd.random() < 0.3 and n_nodes > 1:
        members["n0"]["state"] = "leaving"
    s = ClusterState(cluster_id="c", version=5, members=members, slots=slots)
    plan = st.plan_rebalance(s)
    assert plan == st.plan_rebalance(s)
    assert len({m["slot"] for m in plan}) == len(plan)
    assert len(plan) == _minimal_moves(s)
    after = run_plan(s, plan)
    active = [(n, sh) for n, i in members.items() if i["state"] == "active"
              for sh in range(i["shards"])]
    counts = Counter(after.slots)
    assert set(counts) <= set(active)
    assert max(counts[o] for o in active) - min(counts[o] for o in active) <= 1
    assert st.plan_rebalance(after) == []


def test_slots_in_a_move_are_not_planned_again():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    plan = st.plan_rebalance(s)
    s, _ = st.apply(s, "start_moves", {"moves": plan[:100]})
    rest = st.plan_rebalance(s)
    assert len(rest) == len(plan) - 100
    assert not {m["slot"] for m in rest} & {m["slot"] for m in plan[:100]}


def test_drain_moves_every_slot_off_the_node_and_keeps_the_rest_even():
    s = boot()
    for i, port in ((2, 6223), (3, 6224)):
        s = apply(s, "add_member", node_id=f"n{i}", info=info(port=port))
    s = run_plan(s, st.plan_rebalance(s))
    plan = st.plan_drain(s, "n2")
    assert all(m["from"][0] == "n2" for m in plan)
    assert len(plan) == st.slots_per_node(s)["n2"]
    s = run_plan(s, plan)
    assert st.slots_per_node(s)["n2"] == 0
    counts = per_shard(s)
    assert max(counts.values()) - min(counts.values()) <= 1
    # the same through the leaving flag, which is what the rebalancer acts on
    s2 = apply(s, "set_leaving", node_id="n3")
    assert all(m["from"][0] == "n3" for m in st.plan_rebalance(s2))


def test_fewer_shards_after_restart_moves_the_orphaned_slots():
    s = boot(shards=4)
    s = apply(s, "add_member", node_id="n1", info=info(shards=2))
    plan = st.plan_rebalance(s)
    assert len(plan) == NUM_SLOTS // 2
    assert {m["from"][1] for m in plan} == {2, 3}


# ---- moves -----------------------------------------------------------------------------

def test_move_lifecycle_and_idempotency():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    mv = [{"slot": 7, "from": ["n1", 1], "to": ["n2", 0]}]
    s, res = st.apply(s, "start_moves", {"moves": mv})
    ref = res["started"]
    assert s.moves[7]["state"] == "copying" and ref == [[7, s.version]]
    # a retried start is accepted and changes nothing
    s_again, res2 = st.apply(s, "start_moves", {"moves": mv})
    assert s_again is s and res2["started"] == ref
    # another move of the same slot is refused, and so is one from the wrong owner
    with pytest.raises(StateError):
        apply(s, "start_moves", moves=[{"slot": 7, "from": ["n1", 1], "to": ["n2", 1]}])
    with pytest.raises(StateError) as e:
        apply(s, "start_moves", moves=[{"slot": 8, "from": ["n2", 0], "to": ["n1", 0]}])
    assert e.value.code == "conflict"
    # all or nothing
    with pytest.raises(StateError):
        apply(s, "start_moves", moves=[{"slot": 9, "from": ["n1", 1], "to": ["n2", 0]},
                                       {"slot": 10, "from": ["n1", 0], "to": ["n9", 0]}])
    assert 9 not in s.moves
    s = apply(s, "set_moves_state", moves=ref, move_state="flipping")
    assert s.moves[7]["state"] == "flipping"
    assert apply(s, "finish_moves", moves=[[7, ref[0][1] + 99]]) is s  # wrong id: ignored
    s = apply(s, "finish_moves", moves=ref)
    assert s.slots[7] == ("n2", 0) and 7 not in s.moves
    assert apply(s, "finish_moves", moves=ref) is s  # a late duplicate does nothing
    s, res = st.apply(s, "start_moves", {"moves": [{"slot": 7, "from": ["n2", 0],
                                                    "to": ["n1", 1]}]})
    s = apply(s, "abort_moves", moves=res["started"])
    assert s.slots[7] == ("n2", 0) and not s.moves


def test_version_grows_only_on_change():
    s = boot()
    v = s.version
    s = apply(s, "noop")
    assert s.version == v
    s = apply(s, "add_member", node_id="n2", info=info(port=6223))
    assert s.version == v + 1


# ---- removal ---------------------------------------------------------------------------

def test_remove_refuses_a_member_that_still_owns_slots():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    s = run_plan(s, st.plan_rebalance(s))
    with pytest.raises(StateError) as e:
        apply(s, "remove_member", node_id="n2")
    assert e.value.code == "busy"
    s = run_plan(apply(s, "set_leaving", node_id="n2"), st.plan_drain(s, "n2"))
    s = apply(s, "remove_member", node_id="n2")
    assert "n2" not in s.members
    assert apply(s, "remove_member", node_id="n2") is s
    with pytest.raises(StateError):
        apply(s, "remove_member", node_id="n1")  # the last one


def test_forced_remove_hands_slots_over_at_once():
    s = boot()
    for i, port in ((2, 6223), (3, 6224)):
        s = apply(s, "add_member", node_id=f"n{i}", info=info(port=port))
    s = run_plan(s, st.plan_rebalance(s))
    s, _ = st.apply(s, "start_moves", {"moves": [{"slot": s.slots.index(("n1", 0)),
                                                  "from": ["n1", 0], "to": ["n3", 0]}]})
    s, res = st.apply(s, "remove_member", {"node_id": "n3", "force": True})
    assert "n3" not in s.members and not s.moves
    assert res["reassigned"] > 0
    counts = per_shard(s)
    assert {n for n, _ in counts} == {"n1", "n2"}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_last_active_member_cannot_leave():
    with pytest.raises(StateError):
        apply(boot(), "set_leaving", node_id="n1")


# ---- queue groups ----------------------------------------------------------------------

def test_queue_groups_per_node():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    s = apply(s, "queue_group_add", node_id="n1", subject="jobs.>", queue="w")
    s = apply(s, "queue_group_add", node_id="n2", subject="jobs.>", queue="w")
    assert apply(s, "queue_group_add", node_id="n2", subject="jobs.>", queue="w") is s
    assert s.queue_group_nodes("jobs.>", "w") == ["n1", "n2"]
    s = apply(s, "queue_group_remove", node_id="n1", subject="jobs.>", queue="w")
    assert s.queue_group_nodes("jobs.>", "w") == ["n2"]
    s = apply(s, "set_queue_groups", node_id="n2", groups=[["a", "q"], ["b", "q"]])
    assert s.queue_groups["n2"] == (("a", "q"), ("b", "q"))
    with pytest.raises(StateError):
        apply(s, "queue_group_add", node_id="nope", subject="a", queue="q")


# ---- serialisation ---------------------------------------------------------------------

def test_round_trip_through_json(tmp_path):
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    s, _ = st.apply(s, "start_moves", {"moves": st.plan_rebalance(s)[:3]})
    s = apply(s, "queue_group_add", node_id="n2", subject="x", queue="q")
    d = json.loads(json.dumps(s.to_dict()))
    assert ClusterState.from_dict(d) == s
    path = tmp_path / "state.json"
    st.write_snapshot(str(path), s)
    assert st.read_snapshot(str(path)) == s
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp left behind


def test_owner_lookups():
    s = apply(boot(), "add_member", node_id="n2", info=info(port=6223))
    s = run_plan(s, st.plan_rebalance(s))
    node, shard = s.owner_of("m-abc")
    assert s.owner(st.slot_of("m-abc")) == (node, shard)
    local = s.shard_owners("n2")
    assert sum(x is not None for x in local) == NUM_SLOTS // 2
    assert s.node_at("127.0.0.1:6223") == "n2" and s.address_of("n1") == "127.0.0.1:6222"


def test_client_urls_leave_out_leaving_and_lame_duck_members():
    s = boot()
    s = apply(s, "add_member", node_id="n2", info=info(host="10.0.0.2", port=6223))
    s = apply(s, "add_member", node_id="n3", info=info(host="::1", port=6224))
    assert st.client_urls(s.members) == ["10.0.0.2:4222", "127.0.0.1:4222", "[::1]:4222"]
    assert st.client_urls(s.members, exclude="n1") == ["10.0.0.2:4222", "[::1]:4222"]
    ducked = apply(s, "set_lame_duck", node_id="n2")
    assert st.client_urls(ducked.members) == ["127.0.0.1:4222", "[::1]:4222"]
    assert apply(ducked, "set_lame_duck", node_id="n2") is ducked  # idempotent
    back = apply(ducked, "set_lame_duck", node_id="n2", lame_duck=False)
    assert back.members == s.members  # no lame_duck key left: reads like an older state
    leaving = apply(s, "set_leaving", node_id="n3")
    assert st.client_urls(leaving.members) == ["10.0.0.2:4222", "127.0.0.1:4222"]
    with pytest.raises(StateError):
        apply(s, "set_lame_duck", node_id="nope")


def test_state_written_before_lame_duck_existed_reads_and_gives_urls():
    old = {"cluster_id": "c1", "version": 3, "slots": [["n1", 0]] * NUM_SLOTS,
           "members": {"n1": {"advertise": "a.svc", "cluster_port": 6222, "nats_port": 4222,
                              "shards": 1, "gateways": 1, "joined_at": 1.0, "state": "active"}}}
    assert st.client_urls(ClusterState.from_dict(json.loads(json.dumps(old))).members) == ["a.svc:4222"]
