"""The mesh between gateways (``Peers``): two of them in one process, each with its real
``Router``, over real ZeroMQ ipc sockets. Interest crosses, frames are marked and acked,
the barrier waits for the acks (and not forever for a peer that is gone), a peer that
leaves takes its interest with it, and one that restarts learns the interest again."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from mq9 import endpoints
from mq9.config import Config
from mq9.gateway.client import Subscription
from mq9.gateway.peers import Peers
from mq9.gateway.router import Router
from mq9.gateway.topology import gateway_id

WAIT = 10.0  # seconds; generous, the machine may be busy
A, B = gateway_id("local", 0), gateway_id("local", 1)


class Mesh:
    def __init__(self, cfg: Config, loop):
        self.cfg, self.loop = cfg, loop
        self.ctx = zmq.Context()
        self.made: list[Peers] = []
        self.all = {gateway_id("local", j): endpoints.gateway_endpoint(cfg, j) for j in range(2)}

    def start(self, index: int, barrier_timeout: float = WAIT) -> tuple[Peers, Router]:
        # The real 250 ms fallback would let a busy machine pass a barrier before the acks
        # came; tests that want the fallback say so.
        me = gateway_id("local", index)
        peers = Peers(self.cfg, me, index, self.ctx, self.loop, barrier_timeout=barrier_timeout)
        router = Router(me, peers)
        self.made.append(peers)
        peers.start(router, self.all)
        return peers, router

    async def barrier(self, peers: Peers) -> None:
        done = self.loop.create_future()
        peers.barrier(lambda: done.done() or done.set_result(None))
        await asyncio.wait_for(done, WAIT)

    def close(self) -> None:
        for p in self.made:
            if not p.pull.closed:
                p.close()
        self.ctx.term()


@pytest.fixture
async def mesh(tmp_path):
    cfg = Config(host="127.0.0.1", data_dir=str(tmp_path / "data"), gateways=2, shards=1,
                 cluster_port=0)
    m = Mesh(cfg, asyncio.get_running_loop())
    yield m
    m.close()


def sub(subject: str, key: int, queue: str | None = None) -> Subscription:
    # interest needs no connection: the router only counts it and tells the peers
    return Subscription(None, str(key), subject, queue, key)


async def test_interest_crosses_and_the_barrier_waits_for_the_acks(mesh):
    a, ra = mesh.start(0)
    b, rb = mesh.start(1)
    s = sub("orders.*", 1)
    ra.add_local(s)
    done = asyncio.get_running_loop().create_future()
    a.barrier(lambda: done.done() or done.set_result(None))
    sent = a.sent[B]  # what the barrier waits for (b's hello may make a send more later)
    await asyncio.wait_for(done, WAIT)
    assert rb.has_interest("orders.new") and not rb.has_interest("other")
    # every frame a sent to b before the barrier is marked, and b acknowledged it
    assert sent >= 1 and a.acked[B] >= sent
    ra.remove_local(s)
    await mesh.barrier(a)
    assert not rb.has_interest("orders.new")


async def test_frames_of_acks_alone_are_not_marked(mesh):
    a, _ = mesh.start(0)
    b, rb = mesh.start(1)
    await mesh.barrier(a)
    await mesh.barrier(b)
    quiet = b.sent[A]
    for i in range(5):
        a.handler.add_local(sub(f"s.{i}", i))
        await mesh.barrier(a)
    # b answered five marks with acks only: acking an ack would never end
    assert a.acked[B] == a.sent[B] and b.sent[A] == quiet
    assert all(rb.has_interest(f"s.{i}") for i in range(5))


async def test_a_silent_peer_holds_a_barrier_only_until_the_timeout(mesh, tmp_path):
    a, _ = mesh.start(0, barrier_timeout=0.2)
    b, _ = mesh.start(1)
    await mesh.barrier(a)
    nobody = gateway_id("gone", 0)
    a.update({**mesh.all, nobody: f"ipc://{tmp_path}/nobody.ipc"})  # nothing ever binds it
    a.handler.add_local(sub("x", 1))
    await mesh.barrier(a)  # released by the timeout, not by an ack
    assert nobody in a.stalled and B not in a.stalled
    await mesh.barrier(a)  # a stalled peer is not waited for as long again
    a.update(mesh.all)
    assert nobody not in a.stalled and nobody not in a.others


async def test_a_peer_that_leaves_takes_its_interest_along(mesh):
    a, ra = mesh.start(0)
    b, rb = mesh.start(1)
    rb.add_local(sub("from.b", 1))
    await mesh.barrier(b)
    assert ra.has_interest("from.b")
    a.update({A: mesh.all[A]})
    assert a.others == [] and not ra.has_interest("from.b")


async def test_a_restarted_peer_learns_the_interest_again(mesh):
    a, ra = mesh.start(0)
    b, rb = mesh.start(1)
    ra.add_local(sub("kept.by.a", 1))
    ra.add_local(sub("jobs", 2, queue="workers"))
    await mesh.barrier(a)
    assert rb.has_interest("kept.by.a")
    b.close()  # the process of gateway 1 is gone; a new one starts in its place
    b2, rb2 = mesh.start(1)
    assert not rb2.has_interest("kept.by.a")
    await mesh.barrier(b2)  # its hello is acked after a answered with its interest
    assert rb2.has_interest("kept.by.a") and rb2.has_interest("jobs")
