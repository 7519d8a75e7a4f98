"""Plain NATS routing (``Router``) on two real in-process gateways of one node: local
delivery, echo, queue groups (one member per message, wherever the members are), interest
between the gateways, and no_responders."""

from __future__ import annotations

import re

from mq9.gateway.conftest import Raw

N = 200  # messages per queue-group test: every member gets some unless the choice is broken


def msgs(data: bytes) -> list[bytes]:
    return re.findall(rb"MSG \S+ \S+ \d+\r\n(\S*)\r\n", data)


async def test_local_subscribers_get_each_message_and_echo_is_honoured(gateways):
    (gw,) = await gateways()
    a = await Raw.connect(gw)
    quiet = await Raw.connect(gw, b'CONNECT {"verbose":false,"echo":false}\r\n')
    for c in (a, quiet):
        c.send(b"SUB news.* 1\r\nSUB news.> 2\r\n")
        await c.flush()
    a.send(b"PUB news.a 2\r\nm1\r\n")
    quiet.send(b"PUB news.b 2\r\nm2\r\n")
    got = {c: await c.flush() for c in (a, quiet)}  # each PUB handled before its PONG
    got = {c: got[c] + await c.flush() for c in (a, quiet)}  # and the other's too
    # every matching subscription of a connection gets its own copy; echo off: not its own
    assert sorted(msgs(got[a])) == [b"m1", b"m1", b"m2", b"m2"]
    assert sorted(msgs(got[quiet])) == [b"m1", b"m1"]


async def test_a_queue_group_gets_each_message_once_beside_plain_subscribers(gateways):
    (gw,) = await gateways()
    members = [await Raw.connect(gw) for _ in range(3)]
    for m in members:
        m.send(b"SUB jobs workers 1\r\n")
    watcher = await Raw.connect(gw)
    watcher.send(b"SUB jobs 9\r\n")
    for c in (*members, watcher):
        await c.flush()
    pub = await Raw.connect(gw)
    pub.send(b"".join(b"PUB jobs %d\r\n%d\r\n" % (len(b"%d" % i), i) for i in range(N)))
    await pub.flush()
    got = [msgs(await m.flush()) for m in members]
    every = sorted(int(x) for g in got for x in g)
    assert every == list(range(N))  # each once, none lost
    assert all(got), [len(g) for g in got]  # the choice spreads over the members
    assert [int(x) for x in msgs(await watcher.flush())] == list(range(N))


async def test_interest_and_messages_cross_to_the_other_gateway(gateways):
    gw0, gw1 = await gateways(2)
    sub = await Raw.connect(gw1)
    sub.send(b"SUB far.away 1\r\n")
    await sub.flush()  # returns once gw0 has handled the interest
    assert gw0.router.has_interest("far.away")
    pub = await Raw.connect(gw0)
    pub.send(b"PUB far.away 5\r\nhello\r\n")
    await pub.flush()  # returns once gw1 has queued the delivery
    assert msgs(await sub.flush()) == [b"hello"]
    sub.send(b"UNSUB 1\r\n")
    await sub.flush()
    assert not gw0.router.has_interest("far.away")


async def test_a_queue_group_spread_over_two_gateways_gets_each_message_once(gateways):
    gw0, gw1 = await gateways(2)
    members = [await Raw.connect(gw) for gw in (gw0, gw1, gw1)]
    for m in members:
        m.send(b"SUB jobs workers 1\r\n")
        await m.flush()
    pub = await Raw.connect(gw0)
    pub.send(b"".join(b"PUB jobs %d\r\n%d\r\n" % (len(b"%d" % i), i) for i in range(N)))
    await pub.flush()
    got = [msgs(await m.flush()) for m in members]
    assert sorted(int(x) for g in got for x in g) == list(range(N))
    # gw1 holds two members, so it weighs twice as much; each member still gets some
    assert all(got), [len(g) for g in got]


async def test_runs_of_pubs_are_routed_like_single_pubs(gateways):
    gw0, gw1 = await gateways(2)
    near, far = await Raw.connect(gw0), await Raw.connect(gw1)
    for c in (near, far):
        c.send(b"SUB run 1\r\n")
        await c.flush()
    pub = await Raw.connect(gw0)
    pub.send(b"".join(b"PUB run 1\r\n%d\r\n" % (i % 10) for i in range(50)))  # one read: a run
    await pub.flush()
    want = [b"%d" % (i % 10) for i in range(50)]
    assert msgs(await near.flush()) == want and msgs(await far.flush()) == want


async def test_a_request_nobody_listens_to_gets_no_responders(gateways):
    (gw,) = await gateways()
    c = await Raw.connect(gw, b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n')
    c.send(b"SUB _INBOX.r.* 1\r\nPUB nobody.here _INBOX.r.1 2\r\nhi\r\n")
    got = await c.until(b"\r\n\r\n")  # the 503 status is a header-only HMSG
    assert got.startswith(b"HMSG _INBOX.r.1 1 ") and b"NATS/1.0 503" in got
