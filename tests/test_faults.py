"""Faults short of a crash, against a real node with real nats-py clients:

- a shard's disk refuses writes (a file-size limit set on the running shard process, which
  makes RocksDB's WAL appends fail with EFBIG, as a full disk does): senders get
  ``unavailable``, /metrics shows it, reads and deliveries go on, the process is not
  restarted, and sends succeed again once the limit is lifted;
- a shard, or the supervisor with every shard, stopped (SIGSTOP) for longer than the
  gateway's shard timeout: every send in that window is answered within a bound, none
  hangs, and after SIGCONT nothing acknowledged is lost;
- a shard stopped for longer than a mailbox's TTL: the mailbox expires right after SIGCONT;
- chaos: kill -9 of random shards, gateways and the supervisor (the whole node) at random
  moments under steady acknowledged load with live subscribers; every acknowledged message
  is delivered, duplicates are counted and bounded; broadcasts alongside arrive at most
  once.

The Raft-leader chaos on a 3-node cluster is in test_cluster.py. docs/RELIABILITY.md has
the promises these check and the figures of the runs.

Random choices come from a seed printed in the output (``MQ9_CHAOS_SEED=...`` replays it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import time
from collections import Counter

import pytest
from acked import (
    Sender,
    SlotMap,
    T,
    boxes_on_both_shards,
    check_all_delivered,
    collect,
    decode,
    kill_whole_node,
    tally_boxes,
    wait_restarted,
    wait_until,
)
from agents import create, query

pytestmark = pytest.mark.timeout(90)

SHARD_TIMEOUT = 3.0  # the gateway answers `unavailable` after this (mq9/gateway/shardlink.py)


def _soft_fsize(pid: int, limit: int) -> None:
    """Set only the soft RLIMIT_FSIZE of ``pid``: an unprivileged process may raise a soft
    limit back up to the hard one, never the hard one itself."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


async def _send_raw(nc, mail_id: str, body: bytes, timeout: float = 2 * SHARD_TIMEOUT) -> dict:
    r = await nc.request(f"$mq9.AI.INBOX.{mail_id}.normal", body, timeout=timeout)
    return json.loads(r.data)


# ---- a shard whose disk refuses writes ---------------------------------------------------


async def test_storage_write_failure_refuses_sends_keeps_reads_and_recovers(node, conns):
    nc = await conns(node.url)
    boxes = await boxes_on_both_shards(nc, per_shard=2, ttl=3600)
    sick = [b for b in boxes if b["shard"] == 0]
    well = [b["mail_id"] for b in boxes if b["shard"] == 1]
    ids = [b["mail_id"] for b in boxes]
    sender = Sender(nc, ids, timeout=2 * SHARD_TIMEOUT)
    for _ in range(40):
        assert await sender.send_one(), sender.summary()
    before = len(sender.acked)
    victim = node.pid_of("shard", 0)
    assert node.metric("mq9_storage_failing") == 0

    _soft_fsize(victim, 1)
    try:
        t0 = time.monotonic()
        ans = await _send_raw(nc, sick[0]["mail_id"], b'{"seq": -1}')
        took = time.monotonic() - t0
        assert ans.get("code") == "unavailable" and "storage" in ans.get("error", ""), ans
        assert took < SHARD_TIMEOUT, f"the storage error took {took:.2f}s (a timeout, not a reply)"
        # Refused at once from now on, on every mailbox of that shard, even in bulk...
        replies = await asyncio.gather(*[_send_raw(nc, b["mail_id"], b'{"seq": -2}')
                                         for b in sick for _ in range(20)])
        assert {r.get("code") for r in replies} == {"unavailable"}, Counter(map(str, replies))
        # ...while the other shard takes sends as usual,
        for mail_id in well:
            assert await sender.send_one(mail_id, "normal"), sender.summary()
        # reads work: QUERY answers with what was stored before,
        q = await query(nc, sick[1]["mail_id"], sick[1]["token"], limit=1000)
        assert q.get("unread") == len(sender.acked_for(sick[1]["mail_id"])), q
        # an owner subscription gets the stored messages,
        got = await collect(nc, sick[0]["mail_id"], len(sender.acked_for(sick[0]["mail_id"])))
        live = {seq for seq, _, _ in got}
        assert set(sender.acked_for(sick[0]["mail_id"])) <= live, (sorted(live), sender.summary())
        # and it shows in /metrics, with the process still the same (no crash loop).
        assert await wait_until(lambda: node.metric("mq9_storage_failing") == 1, timeout=3)
        errors = node.metric("mq9_storage_errors_total")
        assert errors and errors >= 1, errors
        await asyncio.sleep(1.5)
        assert node.pid_of("shard", 0) == victim, "the shard was restarted\n" + node.log_tail()
        assert "child_restarting" not in node.log_text()
    finally:
        _soft_fsize(victim, resource.RLIM_INFINITY)

    t0 = time.monotonic()
    ok = await wait_until(lambda: sender.send_one(sick[0]["mail_id"], "normal"), timeout=5, step=0.2)
    recovered = time.monotonic() - t0
    assert ok, f"sends still fail after the limit was lifted: {sender.summary()}\n" + node.log_tail()
    assert await wait_until(lambda: node.metric("mq9_storage_failing") == 0, timeout=3)
    for _ in range(20):
        assert await sender.send_one(), sender.summary()

    # Every acked message is there (the subscribed mailbox's earlier ones were delivered).
    for seq in [s for s, (m, _, _) in sender.acked.items() if m == sick[0]["mail_id"] and s in live]:
        del sender.acked[seq]
    report = await check_all_delivered(nc, sender, ids)
    assert node.pid_of("shard", 0) == victim
    stored_refused = sum(r["stored_unacked"] for r in report.values())
    assert stored_refused == 0, f"a refused send was stored: {report}"
    print(f"storage failure: {before} acked before, {len(replies) + 1} refused during, "
          f"{errors:.0f} failed writes counted, writes back {recovered:.2f}s after the limit "
          f"was lifted; {sender.summary()}")


# ---- SIGSTOP: a shard, or the supervisor and every shard ---------------------------------


def _stop_cont(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


@pytest.mark.parametrize("victims", ["shard", "supervisor+shards"])
async def test_sigstop_sends_answer_within_bound_and_recover(node, conns, victims):
    """While stopped, a send to a stopped shard is answered ``unavailable`` by the gateway
    after its shard timeout; none waits longer. The gateway has already put such a send on
    the shard's queue, so after SIGCONT the shard may still store it: an unacknowledged
    message that is delivered (counted as ``stored_unacked``), never an acked one lost."""
    nc = await conns(node.url)
    boxes = await boxes_on_both_shards(nc, per_shard=2, ttl=3600)
    ids = [b["mail_id"] for b in boxes]
    stopped = [node.pid_of("shard", 0)]
    if victims != "shard":
        stopped = [node.pid] + node.pids("shard")
    # The client's own timeout is far above the gateway's: a send that waits for it hangs.
    sender = Sender(nc, ids, timeout=3 * SHARD_TIMEOUT, workers=8)
    pause = 5.0
    window = {}

    async def stopper():
        await asyncio.sleep(0.5)
        window["seq0"] = sender.seq
        _stop_cont(stopped, signal.SIGSTOP)
        try:
            await asyncio.sleep(pause)
        finally:
            _stop_cont(stopped, signal.SIGCONT)
        window["seq1"] = sender.seq

    try:
        await asyncio.gather(sender.run(pause + 3.0), stopper())
    finally:
        _stop_cont(stopped, signal.SIGCONT)
    in_window = window["seq1"] - window["seq0"]
    assert sender.failed["timeout"] == 0, f"sends hung until the client gave up: {sender.summary()}"
    assert set(sender.failed) <= {"unavailable"}, sender.summary()
    assert sender.failed["unavailable"] > 0, f"nothing was refused while stopped: {sender.summary()}"
    assert sender.slowest < SHARD_TIMEOUT + 1.5, f"slowest answer {sender.slowest:.2f}s"
    after = [s for s in sender.acked if s >= window["seq1"]]
    assert after, f"no send acked after SIGCONT: {sender.summary()}"
    assert node.survivors(stopped) == stopped, "a stopped process was replaced"

    report = await check_all_delivered(nc, sender, ids)
    unacked_stored = sum(r["stored_unacked"] for r in report.values())
    print(f"SIGSTOP {victims} {pause:.0f}s: {sender.summary()}; {in_window} sends in the window; "
          f"slowest answer {sender.slowest:.2f}s; {unacked_stored} unacked sends stored anyway")


async def test_ttl_expires_when_a_shard_stopped_past_it_resumes(node, conns):
    """The expiry timer is a loop tick on the monotonic clock; deadlines are stored wall-clock
    instants. A shard stopped (SIGSTOP) across a mailbox's deadline must expire it at its
    first tick after SIGCONT, with nobody touching the mailbox."""
    nc = await conns(node.url)
    slots = SlotMap(2)
    for _ in range(40):
        box = await create(nc, ttl=2)
        if slots.shard_for(box["mail_id"]) == 0:
            break
    else:
        raise AssertionError("no mailbox landed on shard 0")
    assert "msg_id" in await _send_raw(nc, box["mail_id"], b'{"seq": 0}')
    await asyncio.sleep(1.2)  # the shard's gauges are set per batch
    before = node.metric('mq9_mailbox_ops_total{op="expire",result="ok"}') or 0
    shard = node.pid_of("shard", 0)
    os.kill(shard, signal.SIGSTOP)
    try:
        await asyncio.sleep(max(0.0, box["expires_at"] - time.time()) + 1.0)
    finally:
        os.kill(shard, signal.SIGCONT)
    t0 = time.monotonic()
    expired = await wait_until(
        lambda: (node.metric('mq9_mailbox_ops_total{op="expire",result="ok"}') or 0) > before,
        timeout=3, step=0.1)
    took = time.monotonic() - t0
    assert expired, "the mailbox did not expire after SIGCONT\n" + node.log_tail()
    q = await query(nc, box["mail_id"], box["token"])
    assert q.get("code") == "not_found", q
    print(f"TTL across SIGSTOP: expired {took:.2f}s after SIGCONT")


# ---- chaos on one node -------------------------------------------------------------------


def chaos_seed() -> int:
    seed = os.environ.get("MQ9_CHAOS_SEED")
    return int(seed) if seed else random.SystemRandom().randrange(1 << 32)


async def reconnecting(conns, url):
    return await conns(url, allow_reconnect=True, max_reconnect_attempts=10_000,
                       reconnect_time_wait=0.1)


class LiveOwner:
    """Owner subscriptions that stay through the chaos (nats-py re-subscribes after each
    reconnect); every pushed message is kept, duplicates included."""

    def __init__(self):
        self.got: dict[str, list] = {}
        self.last = time.monotonic()

    async def subscribe(self, nc, mail_id: str) -> None:
        lst = self.got[mail_id] = []

        async def on_msg(msg):
            lst.append(decode(msg))
            self.last = time.monotonic()

        await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*", cb=on_msg)

    async def quiet(self, seconds: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self.last >= seconds:
                return True
            await asyncio.sleep(0.1)
        return False


async def test_chaos_kill_9_shards_gateways_supervisor_under_acked_load(node, conns):
    seed = chaos_seed()
    rng = random.Random(seed)
    print(f"\nchaos seed {seed} (MQ9_CHAOS_SEED={seed} replays the choices)")
    duration = 20.0
    nc = await conns(node.url)
    boxes = await boxes_on_both_shards(nc, per_shard=5, ttl=3600)
    ids = [b["mail_id"] for b in boxes]
    live_ids = ids[::2]  # owners subscribed the whole time; the rest are collected at the end
    owner = LiveOwner()
    sub_nc = await reconnecting(conns, node.url)
    for m in live_ids:
        await owner.subscribe(sub_nc, m)
    await sub_nc.flush(timeout=T)
    senders = []
    for k in range(3):
        pub = await reconnecting(conns, node.url)
        senders.append(Sender(pub, ids, timeout=2.0, workers=6, first_seq=k * 10_000_000))

    # Broadcasts alongside: at most once (nothing stored, no redelivery), like core NATS.
    casts: list[int] = []

    async def on_cast(msg):
        casts.append(json.loads(msg.data)["n"])

    await sub_nc.subscribe("$mq9.AI.BROADCAST.chaos.*", cb=on_cast)
    await sub_nc.flush(timeout=T)
    cast_nc = await reconnecting(conns, node.url)
    published = 0

    async def broadcaster():
        nonlocal published
        end = time.monotonic() + duration
        while time.monotonic() < end:
            try:
                await cast_nc.publish("$mq9.AI.BROADCAST.chaos.tick", json.dumps({"n": published}).encode())
                published += 1
            except Exception:  # noqa: BLE001, S110 - reconnecting: not published
                pass
            await asyncio.sleep(0.01)

    kills: Counter = Counter()
    log: list[str] = []
    t_start = time.monotonic()

    async def chaos():
        end = t_start + duration - 2.0
        while True:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            if time.monotonic() >= end:
                return
            what = rng.choices(["shard", "gateway", "supervisor"], weights=[4, 4, 2])[0]
            index = rng.randrange(2)
            t = time.monotonic() - t_start
            if what == "supervisor":
                await asyncio.to_thread(kill_whole_node, node)
                await asyncio.to_thread(node.start)
                log.append(f"{t:.1f}s whole node")
            else:
                pid = node.pid_of(what, index)
                assert pid, node.children()
                os.kill(pid, signal.SIGKILL)
                await wait_restarted(node, what, index, pid)
                log.append(f"{t:.1f}s {what}-{index}")
            kills[what] += 1

    await asyncio.gather(chaos(), broadcaster(), *[s.run(duration) for s in senders])
    elapsed = time.monotonic() - t_start
    sender = Sender(nc, ids).merge(*senders)
    assert len(sender.acked) > 1000, sender.summary()
    cast_dups = len(casts) - len(set(casts))
    assert sum(kills.values()) >= 4, kills

    # The rest: live owners get what is still undelivered; the others subscribe now.
    await asyncio.to_thread(node.wait_ready, 20)
    fresh = await conns(node.url)
    later = await asyncio.gather(*[collect(fresh, m, len(sender.acked_for(m)), timeout=20)
                                   for m in ids if m not in live_ids])
    await owner.quiet(1.0, timeout=20)
    got = dict(owner.got)
    got.update(zip([m for m in ids if m not in live_ids], later))

    lost_all, dup_extra, wrong_all, per_box = tally_boxes(sender, {m: got[m] for m in ids})
    delivered = sum(len(g) for g in got.values())
    summary = (f"seed {seed}; {elapsed:.1f}s; kills {dict(kills)}: {', '.join(log)}; "
               f"{sender.summary()}; {delivered} pushed, {dup_extra} duplicate copies; "
               f"broadcasts: {published} published, {len(set(casts))} received, "
               f"{cast_dups} twice; per mailbox (acked, pushed, duplicated): {per_box}")
    print("chaos one node:", summary)
    assert not lost_all, f"{len(lost_all)} acked messages lost: {lost_all[:20]}\n{summary}"
    assert not wrong_all, f"delivered under another msg_id: {wrong_all[:10]}\n{summary}"
    assert cast_dups == 0, f"a broadcast was delivered twice\n{summary}"
    assert casts, summary
    # A duplicate is a message pushed to an owner whose Delivered report died with a shard
    # or gateway: at most what was in flight at each kill.
    assert dup_extra <= max(100, len(sender.acked) // 10), summary
