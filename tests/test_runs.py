"""Publishers that stream: many PUBs to one subject written at once.

The gateway takes such a run in one piece (one route, one shard request, one write per
subscriber). These tests write runs as raw bytes in a single send and check that, taken
together, nothing changes for anyone: every message, in order, once, with every ack and
every error where a one-at-a-time publisher would get it.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from natsraw import RawConn

MSG = re.compile(rb"MSG (\S+) (\S+) (?:(\S+) )?(\d+)\r\n")
HMSG = re.compile(rb"HMSG (\S+) (\S+) (?:(\S+) )?(\d+) (\d+)\r\n")


def messages(data: bytes) -> list[tuple[bytes, bytes | None, bytes, bytes]]:
    """(subject, reply, headers, payload) of every MSG/HMSG in ``data``, in order."""
    out, pos = [], 0
    while True:
        m, h = MSG.search(data, pos), HMSG.search(data, pos)
        first = min((x for x in (m, h) if x), key=lambda x: x.start(), default=None)
        if first is None:
            return out
        if first is h:
            hl, total = int(h[4]), int(h[5])
            body = data[h.end():h.end() + total]
            out.append((h[1], h[3], body[:hl], body[hl:]))
            pos = h.end() + total + 2
        else:
            size = int(m[4])
            out.append((m[1], m[3], b"", data[m.end():m.end() + size]))
            pos = m.end() + size + 2


def conn(node, **opts) -> RawConn:
    c = RawConn(node.port)
    c.handshake(verbose=False, pedantic=False, headers=True, **opts)
    return c


def read_count(c: RawConn, n: int, timeout: float = 10.0) -> list:
    data = b""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        data += c.read_quiet(quiet_ms=100, timeout=1.0)
        got = messages(data)
    return got


def create(c: RawConn, **body) -> dict:
    c.send(b"SUB _INBOX.mk 99\r\nPUB $mq9.AI.MAILBOX.CREATE _INBOX.mk %d\r\n%s\r\n"
           % (len(json.dumps(body)), json.dumps(body).encode()))
    [(_, _, _, payload)] = read_count(c, 1)
    c.send(b"UNSUB 99\r\n")
    return json.loads(payload)


@pytest.fixture
def small_node(node_factory):
    return node_factory(max_msgs=30)


def test_a_run_of_acked_sends_gets_every_ack_and_every_full_error_in_order(small_node):
    owner, sender, monitor = conn(small_node), conn(small_node), conn(small_node)
    mail_id = create(sender)["mail_id"]
    subject = f"$mq9.AI.INBOX.{mail_id}.normal".encode()
    monitor.exchange(b"SUB $mq9.AI.INBOX.*.normal 1\r\nPING\r\n")
    sender.exchange(b"SUB _INBOX.acks.* 1\r\nPING\r\n")
    run = b"".join(b"PUB %s _INBOX.acks.%d %d\r\nm%d\r\n" % (subject, i, len(b"m%d" % i), i)
                   for i in range(50))
    sender.send(run)  # one write: one run at the gateway
    acks = read_count(sender, 50)
    assert [a[0] for a in acks] == [b"_INBOX.acks.%d" % i for i in range(50)]
    bodies = [json.loads(a[3]) for a in acks]
    # max_msgs is 30: the first 30 are stored, the rest refused one by one
    assert [b.get("msg_id") for b in bodies[:30]] == list(range(1, 31))
    assert all(b["priority"] == "normal" and b["mail_id"] == mail_id for b in bodies[:30])
    assert [b.get("code") for b in bodies[30:]] == ["full"] * 20
    seen = read_count(monitor, 30)
    assert [m[3] for m in seen] == [b"m%d" % i for i in range(30)]
    assert [re.search(rb"Mq9-Msg-Id: (\d+)", m[2])[1] for m in seen] == [
        b"%d" % i for i in range(1, 31)]
    owner.send(b"SUB %s 7\r\n" % subject.replace(b".normal", b".*"))
    got = read_count(owner, 30)
    assert [m[3] for m in got] == [b"m%d" % i for i in range(30)]
    for c in (owner, sender, monitor):
        c.close()


def test_a_run_to_a_missing_mailbox_answers_each_request(node):
    c = conn(node)
    c.exchange(b"SUB _INBOX.r.* 1\r\nPING\r\n")
    c.send(b"".join(b"PUB $mq9.AI.INBOX.nobody-here.urgent _INBOX.r.%d 1\r\nx\r\n" % i
                    for i in range(5)) + b"PUB $mq9.AI.INBOX.nobody-here.bogus _INBOX.r.9 1\r\nx\r\n")
    # (the bad priority is refused by the gateway at once, before the shard answers)
    codes = {m[0]: json.loads(m[3])["code"] for m in read_count(c, 6)}
    assert codes == {**{b"_INBOX.r.%d" % i: "not_found" for i in range(5)},
                     b"_INBOX.r.9": "bad_request"}
    c.close()


def test_a_run_of_mailbox_requests_answers_each_and_watchers_see_each(node):
    """A run to MAILBOX.CREATE is one request per message, like single PUBs; watchers of
    '$mq9.AI.#' see every request (without its reply subject); a run to another '$mq9.AI'
    subject is plain NATS."""
    c, watcher = conn(node), conn(node)
    watcher.exchange(b"SUB $mq9.AI.# 1\r\nPING\r\n")
    c.exchange(b"SUB _INBOX.c.* 1\r\nSUB $mq9.AI.OTHER.x 2\r\nPING\r\n")
    bodies = [b'{"ttl":%d}' % (60 + i) for i in range(4)] + [b'{"type":"bogus"}']
    c.send(b"".join(b"PUB $mq9.AI.MAILBOX.CREATE _INBOX.c.%d %d\r\n%s\r\n" % (i, len(b), b)
                    for i, b in enumerate(bodies))
           + b"".join(b"PUB $mq9.AI.OTHER.x %d\r\no%d\r\n" % (len(b"o%d" % i), i) for i in range(3)))
    got = read_count(c, 8)
    replies = {m[0]: json.loads(m[3]) for m in got if m[0].startswith(b"_INBOX.c.")}
    assert sorted(replies) == [b"_INBOX.c.%d" % i for i in range(5)]
    assert [replies[b"_INBOX.c.%d" % i]["ttl"] for i in range(4)] == [60, 61, 62, 63]
    assert len({replies[b"_INBOX.c.%d" % i]["mail_id"] for i in range(4)}) == 4
    assert replies[b"_INBOX.c.4"] == {"error": "'type' must be \"standard\" or \"latest\"",
                                      "code": "bad_request"}
    assert [m[3] for m in got if m[0] == b"$mq9.AI.OTHER.x"] == [b"o0", b"o1", b"o2"]
    seen = read_count(watcher, 8)
    requests = [m for m in seen if m[0] == b"$mq9.AI.MAILBOX.CREATE"]
    assert [m[3] for m in requests] == bodies and all(m[1] is None for m in requests)
    c.close()
    watcher.close()


def test_a_broadcast_run_reaches_every_subscriber_in_order_on_every_gateway(node):
    subs = [conn(node) for _ in range(6)]  # spread over both gateway processes
    for i, s in enumerate(subs):
        s.exchange(b"SUB $mq9.AI.BROADCAST.news.> %d\r\nPING\r\n" % i)
    workers = [conn(node) for _ in range(4)]
    for w in workers:
        w.exchange(b"SUB $mq9.AI.BROADCAST.news.sports q 1\r\nPING\r\n")
    pub = conn(node)
    pub.exchange(b"PING\r\n")
    pub.send(b"".join(b"PUB $mq9.AI.BROADCAST.news.sports %d\r\nn%d\r\n" % (len(b"n%d" % i), i)
                      for i in range(300)))
    for s in subs:
        assert [m[3] for m in read_count(s, 300)] == [b"n%d" % i for i in range(300)]
    # the queue group took every message exactly once, across gateways
    taken = [m[3] for w in workers for m in read_count(w, 1, timeout=1.0)]
    for w in workers:
        taken += [m[3] for m in messages(w.read_quiet(quiet_ms=200))]
    assert sorted(taken) == sorted(b"n%d" % i for i in range(300))
    for c in subs + workers + [pub]:
        c.close()


def test_a_run_with_unsub_max_stops_at_the_limit(node):
    sub, pub = conn(node), conn(node)
    sub.exchange(b"SUB plain.x 1\r\nUNSUB 1 7\r\nPING\r\n")
    pub.exchange(b"PING\r\n")
    pub.send(b"PUB plain.x 1\r\nz\r\n" * 20)
    got = read_count(sub, 20, timeout=1.5)
    assert len(got) == 7
    sub.close()
    pub.close()
