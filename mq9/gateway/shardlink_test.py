"""The gateway's side of the shard link (``ShardLink``) on a real in-process gateway, with
a real ZeroMQ ROUTER socket in the test where shard 0 listens: Hello first on a new
socket, answers matched to requests by rid in any order, a request nobody answers ends as
``unavailable`` (once, whatever comes late), ``moved`` is asked again, and a shard that
comes back gets the owner subscriptions again."""

from __future__ import annotations

import asyncio
import os

import pytest
import zmq

from mq9 import endpoints, wire
from mq9.gateway.conftest import Raw

WAIT = 10.0  # seconds; generous, the machine may be busy
TOKEN = b"t" * 32


class FakeShardSocket:
    """A ROUTER bound where shard 0 listens: what a shard process receives, as wire structs."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        os.makedirs(os.path.dirname(endpoint[len("ipc://"):]), exist_ok=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.ident: bytes | None = None

    async def ops(self, until, timeout: float = WAIT) -> list:
        """Ops received until ``until(ops)`` holds."""
        got: list = []
        deadline = asyncio.get_running_loop().time() + timeout
        while not until(got):
            assert asyncio.get_running_loop().time() < deadline, f"only got {got}"
            if self.sock.poll(0):
                self.ident, frame = self.sock.recv_multipart()
                got += wire.decode_to_shard(frame)
            else:
                await asyncio.sleep(0.01)
        return got

    def answer(self, *items) -> None:
        self.sock.send_multipart([self.ident, wire.encode(list(items))])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
async def link_and_shard(gateways):
    (gw,) = await gateways()
    shard = FakeShardSocket(gw.ctx, endpoints.shard_endpoint(gw.cfg, 0))
    yield gw, shard
    shard.close()


class Answers:
    def __init__(self):
        self.got: dict[str, list] = {}
        self.event = asyncio.Event()

    def __call__(self, answer, arg) -> None:
        self.got.setdefault(arg, []).append(answer)
        self.event.set()

    async def wait(self, *args) -> None:
        async def all_in():
            while not all(a in self.got for a in args):
                self.event.clear()
                await self.event.wait()
        await asyncio.wait_for(all_in(), WAIT)


def has_rids(*rids):
    return lambda ops: {getattr(o, "rid", None) for o in ops} >= set(rids)


async def test_hello_first_then_answers_matched_by_rid_in_any_order(link_and_shard):
    gw, shard = link_and_shard
    link, target = gw.link, (gw.topology.node, 0)
    answers = Answers()
    r1, r2 = link.next_rid(), link.next_rid()
    assert r2 == r1 + 1
    link.request(target, wire.Query(r1, "box-1", TOKEN), answers, "first")
    link.request(target, wire.Query(r2, "box-2", TOKEN), answers, "second")
    ops = await shard.ops(has_rids(r1, r2))
    assert ops[0] == wire.Hello()  # the shard forgets an earlier process of this gateway
    assert shard.ident == gw.gw_id.encode()
    shard.answer(wire.Result(r2, data={"n": 2}), wire.Result(r1, data={"n": 1}))
    await answers.wait("first", "second")
    assert [a.data for a in answers.got["first"]] == [{"n": 1}]
    assert [a.data for a in answers.got["second"]] == [{"n": 2}]
    assert r1 not in link.pending and r2 not in link.pending


async def test_a_request_nobody_answers_is_unavailable_once(link_and_shard):
    gw, shard = link_and_shard
    link, target = gw.link, (gw.topology.node, 0)
    link.timeout = 0.3
    answers = Answers()
    rid = link.next_rid()
    link.request(target, wire.Query(rid, "box", TOKEN), answers, "q")
    await shard.ops(has_rids(rid))  # received, never answered in time
    await answers.wait("q")
    (late,) = answers.got["q"]
    assert (late.rid, late.code) == (rid, "unavailable")
    shard.answer(wire.Result(rid, data={"too": "late"}))
    other = link.next_rid()  # a request after it shows the late answer was read and dropped
    link.request(target, wire.Query(other, "box", TOKEN), answers, "after")
    await shard.ops(has_rids(other))
    shard.answer(wire.Result(other))
    await answers.wait("after")
    assert len(answers.got["q"]) == 1 and rid not in link.pending


async def test_a_moved_answer_is_asked_again(link_and_shard):
    gw, shard = link_and_shard
    link, target = gw.link, (gw.topology.node, 0)
    answers = Answers()
    rid = link.next_rid()
    link.request(target, wire.Query(rid, "box", TOKEN), answers, "q")
    await shard.ops(has_rids(rid))
    shard.answer(wire.Result(rid, code="moved"))
    # the slot map still names this shard, so the same request comes here again
    (again,) = [o for o in await shard.ops(has_rids(rid)) if getattr(o, "rid", None) == rid]
    assert again == wire.Query(rid, "box", TOKEN)
    assert "q" not in answers.got
    shard.answer(wire.Result(rid, data={"ok": True}))
    await answers.wait("q")
    assert [a.data for a in answers.got["q"]] == [{"ok": True}]


async def test_a_shard_that_comes_back_gets_the_owner_subscriptions_again(link_and_shard):
    gw, shard = link_and_shard
    c = await Raw.connect(gw)
    c.send(b"SUB $mq9.AI.INBOX.box-7.* 1\r\n")
    await c.flush()

    def subscribed(ops):
        return any(isinstance(o, wire.Subscribe) and o.mail_id == "box-7" for o in ops)

    first = await shard.ops(subscribed)
    assert first[0] == wire.Hello()
    shard.close()  # the shard process is restarted: a new socket at the same endpoint
    back = FakeShardSocket(gw.ctx, endpoints.shard_endpoint(gw.cfg, 0))
    try:
        ops = await back.ops(subscribed)
        assert wire.Hello() not in ops  # the same gateway process: nothing to forget
    finally:
        back.close()
