"""Random operation sequences against a model of what the gateways hold: no acknowledged
send is ever lost, nothing is pushed while it is in flight elsewhere, and a final replay
returns exactly the undelivered messages in delivery order."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mq9 import subjects, wire
from mq9.shard.batch import Shard
from mq9.shard.mailbox_test import TOK, Clock, pushed
from mq9.shard.state import DELIVERED, INFLIGHT, PENDING, prio_of, state_of
from mq9.shard.store import Store

PRIOS = subjects.PRIORITIES
GWS = (b"g1", b"g2")

op_st = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(PRIOS), st.integers(1, 4)),
    st.tuples(st.just("sub"), st.sampled_from(GWS), st.integers(1, 4), st.integers(1, 7),
              st.sampled_from([None, "q"])),
    st.tuples(st.just("unsub"), st.sampled_from(GWS), st.integers(1, 4)),
    st.tuples(st.just("ack"), st.sampled_from(GWS), st.integers(1, 4), st.integers(0, 5)),
    st.tuples(st.just("nack"), st.sampled_from(GWS), st.integers(1, 4), st.integers(0, 5)),
    st.tuples(st.just("hello"), st.sampled_from(GWS)),
    st.tuples(st.just("query"), st.integers(1, 5)),
    st.tuples(st.just("restart")),
)


class World:
    def __init__(self, path):
        self.path = path
        self.clock = Clock()
        self.rid = 0
        self.undelivered: set[int] = set()  # acknowledged sends nobody has received yet
        self.held: dict[tuple[bytes, int], list[int]] = {}  # pushed, not yet acked/nacked
        self.open()
        self.batch([(b"g1", wire.Create(0, "box", "standard", 0, TOK))])

    def open(self):
        self.store = Store(self.path)
        self.shard = Shard(self.store, clock=self.clock, window=3, max_msgs=8)
        self.shard.load()

    def batch(self, ops) -> dict:
        self.shard.begin()
        for gw, op in ops:
            self.shard.apply(gw, op)
        out = self.shard.finish()
        for items in out.values():
            for it in items:
                if isinstance(it, wire.ANSWERS) and it.code is None and "msg_id" in it.data:
                    self.undelivered.add(it.data["msg_id"])
        before = {k: set(v) for k, v in self.held.items()}
        for gw, items in out.items():
            for it in pushed(items):
                k = (gw, it.key)
                assert k in self.held, f"push to unknown subscription {k}"
                for other, ids in before.items():
                    assert it.msg_id not in ids, f"{it.msg_id} pushed while in flight to {other}"
                assert it.msg_id in self.undelivered
                if it.msg_id not in self.held[k]:  # one push may reach several subs
                    self.held[k].append(it.msg_id)
        return out

    def forget(self, ids):
        for lst in self.held.values():
            lst[:] = [m for m in lst if m not in ids]

    def step(self, op):
        kind = op[0]
        if kind == "send":
            for _ in range(op[2]):
                self.rid += 1
                out = self.batch([(b"g1", wire.Send(self.rid, "box", op[1], "s", b"p"))])
                res = [r for r in out[b"g1"] if isinstance(r, wire.ANSWERS)][0]
                if res.code is not None:
                    assert res.code == "full" and len(self.undelivered) == 8
        elif kind == "sub":
            _, gw, key, mask, queue = op
            self.held[(gw, key)] = []
            self.batch([(gw, wire.Subscribe(key, "box", mask, queue))])
        elif kind == "unsub":
            _, gw, key = op
            self.held.pop((gw, key), None)
            self.batch([(gw, wire.Unsubscribe(key, "box"))])
        elif kind in ("ack", "nack"):
            _, gw, key, n = op
            lst = self.held.get((gw, key))
            if not lst:
                return
            ids = lst[:n]
            del lst[:n]
            if kind == "ack":
                self.undelivered -= set(ids)
                self.forget(set(ids))
                self.batch([(gw, wire.Delivered(key, "box", ids))])
            else:
                self.batch([(gw, wire.Undelivered(key, "box", ids))])
        elif kind == "hello":
            for k in [k for k in self.held if k[0] == op[1]]:
                del self.held[k]
            self.batch([(op[1], wire.Hello())])
        elif kind == "query":
            self.rid += 1
            out = self.batch([(b"g1", wire.Query(self.rid, "box", TOK, op[1], True))])
            res = out[b"g1"][0]
            ids = [m["msg_id"] for m in res.data["messages"]]
            assert set(ids) <= self.undelivered
            self.undelivered -= set(ids)
            self.forget(set(ids))
        elif kind == "restart":
            self.store.close()
            self.held.clear()
            self.open()
        self.check()

    def check(self):
        mb = self.shard.mailboxes["box"]
        assert mb.undelivered == len(self.undelivered)
        states = {mid: state_of(v) for mid, v in mb.msgs.items()}
        assert {m for m, s in states.items() if s != DELIVERED} == self.undelivered
        pend = [m for dq in mb.pending for m in dq if states.get(m) == PENDING]
        assert sorted(pend) == sorted(m for m, s in states.items() if s == PENDING)
        assert len(pend) == len(set(pend))
        assert set(mb.inflight) == {m for m, s in states.items() if s == INFLIGHT}
        assert len(mb.inflight) <= 3
        for mid, holders in mb.inflight.items():
            assert holders
            for s in holders:
                assert mid in s.inflight and self.shard.subs[s.gw][s.key] is s

    def final_replay(self):
        self.batch([(b"g1", wire.Hello()), (b"g2", wire.Hello())])
        self.held = {(b"g9", 1): []}
        self.batch([(b"g9", wire.Subscribe(1, "box", 7))])
        seen = []
        while self.held[(b"g9", 1)]:
            ids = self.held[(b"g9", 1)]
            self.held[(b"g9", 1)] = []
            seen.extend(ids)
            self.undelivered -= set(ids)
            self.batch([(b"g9", wire.Delivered(1, "box", ids))])
        assert not self.undelivered, f"never replayed: {sorted(self.undelivered)}"
        assert len(seen) == len(set(seen))
        prio = {mid: prio_of(v) for mid, v in self.shard.mailboxes["box"].msgs.items()}
        order = [(prio[m], m) for m in seen]
        assert order == sorted(order)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=40))
def test_random_sequences_lose_nothing_and_never_duplicate(ops):
    with tempfile.TemporaryDirectory() as d:
        w = World(d + "/db")
        try:
            for op in ops:
                w.step(op)
            w.final_replay()
        finally:
            w.store.close()
