"""One client connection (``Client``) on a real in-process gateway: protocol ops as the
parser hands them over, output gathered per loop turn, the slow-consumer cut-off and the
stale-connection check. The byte-for-byte comparison with nats-server is in
tests/test_protocol_diff.py; this pins down the connection's own bookkeeping."""

from __future__ import annotations

import asyncio

from mq9.gateway.conftest import Raw
from mq9.protocol import errors


def client_of(gw, raw_count: int = 1):
    """The gateway's ``Client`` objects, oldest first."""
    clients = sorted(gw.clients.values(), key=lambda c: c.cid)
    assert len(clients) == raw_count, clients
    return clients


async def test_verbose_connect_sub_pub_unsub_each_answered_in_order(gateways):
    (gw,) = await gateways()
    c = await Raw.connect(gw, b'CONNECT {"verbose":true}\r\n')
    c.send(b"SUB foo 1\r\nPUB foo 5\r\nhello\r\nUNSUB 1\r\nPUB foo 3\r\nbye\r\n")
    # +OK for CONNECT, SUB, PUB (before the MSG it produces), UNSUB, PUB; nothing after UNSUB
    assert await c.flush() == (b"+OK\r\n+OK\r\n+OK\r\nMSG foo 1 5\r\nhello\r\n+OK\r\n+OK\r\n")
    (client,) = client_of(gw)
    assert client.connected and client.verbose and client.subs == {}
    assert (client.msgs_in, client.msgs_out, client.bytes_in, client.bytes_out) == (2, 1, 8, 5)


async def test_reply_subject_queue_group_and_headers_reach_the_subscriber(gateways):
    (gw,) = await gateways()
    sub = await Raw.connect(gw, b'CONNECT {"verbose":false,"headers":true}\r\n')
    sub.send(b"SUB q.* workers 7\r\n")
    await sub.flush()
    pub = await Raw.connect(gw, b'CONNECT {"verbose":false,"headers":true}\r\n')
    pub.send(b"PUB q.a _INBOX.r 2\r\nhi\r\nHPUB q.b 12 14\r\nNATS/1.0\r\n\r\nho\r\n")
    await pub.flush()
    assert await sub.flush() == (b"MSG q.a 7 _INBOX.r 2\r\nhi\r\n"
                                 b"HMSG q.b 7 12 14\r\nNATS/1.0\r\n\r\nho\r\n")
    (s, _) = client_of(gw, 2)
    assert s.subs["7"].queue == "workers" and s.subs["7"].delivered == 2


async def test_unsub_with_a_maximum_removes_the_subscription_after_that_many(gateways):
    (gw,) = await gateways()
    c = await Raw.connect(gw)
    c.send(b"SUB foo 1\r\nUNSUB 1 2\r\n" + b"PUB foo 1\r\nx\r\n" * 3)
    assert await c.flush() == b"MSG foo 1 1\r\nx\r\n" * 2
    (client,) = client_of(gw)
    assert client.subs == {}
    assert not gw.router.has_interest("foo")  # the gateway forgot it too


async def test_a_bad_subject_a_reused_sid_and_the_subscription_limit(gateways):
    (gw,) = await gateways(max_subscriptions=2)
    c = await Raw.connect(gw)
    c.send(b"SUB foo..bar 1\r\nSUB a 1\r\nSUB b 1\r\nSUB c 2\r\nSUB d 3\r\n")
    # the reused sid keeps its first subscription (a); the third is over the limit
    assert await c.flush() == (errors.err_line(errors.INVALID_SUBJECT)
                               + errors.err_line(errors.MAX_SUBSCRIPTIONS_EXCEEDED))
    (client,) = client_of(gw)
    assert {sid: s.subject for sid, s in client.subs.items()} == {"1": "a", "2": "c"}


async def test_hpub_without_header_support_closes_the_connection(gateways):
    (gw,) = await gateways()
    c = await Raw.connect(gw)  # CONNECT without "headers"
    c.send(b"HPUB foo 12 14\r\nNATS/1.0\r\n\r\nho\r\n")
    await c.rest()  # closed by the server (nats-server says nothing here)
    await asyncio.sleep(0)
    assert gw.clients == {}


async def test_deliveries_of_one_loop_turn_are_written_together(gateways):
    (gw,) = await gateways()
    c = await Raw.connect(gw)
    c.send(b"SUB foo 1\r\n")
    await c.flush()
    (client,) = client_of(gw)
    sub = client.subs["1"]
    for i in range(3):
        client.deliver(sub, "foo", None, None, b"m%d" % i)
    # queued, not written: the gateway flushes each connection once at the end of the turn
    assert len(client.out) == 3 and client.out_size == 3 * len(b"MSG foo 1 2\r\nm0\r\n")
    await asyncio.sleep(0)
    assert client.out == [] and client.out_size == 0
    assert await c.until(b"m2\r\n") == b"MSG foo 1 2\r\nm0\r\nMSG foo 1 2\r\nm1\r\nMSG foo 1 2\r\nm2\r\n"


async def test_a_client_with_more_than_max_pending_queued_is_cut_off(gateways):
    (gw,) = await gateways(max_pending=64 * 1024)
    slow = await Raw.connect(gw)
    slow.send(b"SUB foo 1\r\n")
    await slow.flush()
    other = await Raw.connect(gw)
    await other.flush()
    (client, bystander) = client_of(gw, 2)
    sub = client.subs["1"]
    payload = b"x" * 1024
    sent = 0
    while not client.closed:  # within one loop turn: nothing leaves before the cut-off
        client.deliver(sub, "foo", None, None, payload)
        sent += 1
        assert sent < 1000
    msg = len(b"MSG foo 1 1024\r\n" + payload + b"\r\n")
    assert (sent - 1) * msg <= 64 * 1024 < sent * msg  # cut at the first byte over the limit
    assert gw.slow_consumers == 1 and client.cid not in gw.clients
    # what was queued is still handed over, then the connection ends (nats-server sends
    # no -ERR for a slow consumer)
    got = await slow.rest()
    assert got.count(b"MSG foo 1 1024\r\n") == sent and b"-ERR" not in got
    # the other connection is untouched
    assert not bystander.closed and await other.flush() == b""


async def test_unanswered_pings_make_the_connection_stale(gateways):
    (gw,) = await gateways(ping_interval=0.2, max_pings_out=2)
    mute = await Raw.connect(gw)
    alive = await Raw.connect(gw)
    answered = 0

    async def answer_pings():
        nonlocal answered
        while True:
            await alive.until(b"PING\r\n")
            alive.send(b"PONG\r\n")
            answered += 1

    answering = asyncio.ensure_future(answer_pings())
    try:
        got = await mute.rest()
        # two PINGs left unanswered, then nats-server's error, then the close
        assert got == b"PING\r\nPING\r\n" + errors.err_line(errors.STALE_CONNECTION)
        # the connection that answers is kept, across more PINGs than max_pings_out
        seen = answered
        while answered < seen + 3:
            assert not answering.done(), answering.exception()
            await asyncio.sleep(0.05)
    finally:
        answering.cancel()
    (client,) = client_of(gw)
    assert not client.closed and client.pings_out <= 1
