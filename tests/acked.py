"""Acknowledged sends and the check that each one is delivered: shared by the crash, fault
and chaos tests.

A send is "acknowledged" when ``nc.request`` on ``$mq9.AI.INBOX.{id}.{prio}`` returned
``{"msg_id": ...}``; a timeout, a closed connection or an error reply (``unavailable``...)
means "not acknowledged", and such a message may or may not be stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter, defaultdict

from agents import create
from nats.errors import TimeoutError as NatsTimeout
from nodeproc import REPO, tcp_row

if str(REPO) not in sys.path:  # `cluster` is a top-level package of the work tree
    sys.path.insert(0, str(REPO))
from mq9.cluster.slots import SlotMap  # noqa: E402

T = 5.0  # the longest a single wait may take
PRIO_RANK = {"urgent": 0, "normal": 1, "notify": 2}


async def boxes_on_both_shards(nc, per_shard: int, shards: int = 2, **body) -> list[dict]:
    """``per_shard`` mailboxes on each shard (mail_ids are random; create until placed)."""
    slots = SlotMap(shards)
    by_shard: dict[int, list[dict]] = defaultdict(list)
    for _ in range(per_shard * shards * 20):
        if all(len(by_shard[s]) >= per_shard for s in range(shards)):
            break
        box = await create(nc, **body)
        shard = slots.shard_for(box["mail_id"])
        if len(by_shard[shard]) < per_shard:
            box["shard"] = shard
            by_shard[shard].append(box)
    assert all(len(by_shard[s]) == per_shard for s in range(shards)), dict(by_shard)
    return [b for s in range(shards) for b in by_shard[s]]


async def wait_until(pred, timeout=T, step=0.05):
    """Poll a predicate (sync or async) until truthy (returned) or the time is up."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(step)
    return last


async def wait_restarted(node, kind: str, index: int, old_pid: int, timeout: float = 20.0) -> int:
    """The supervisor has replaced ``old_pid`` and the node is ready again; the new pid."""
    def replaced():
        pid = node.pid_of(kind, index)
        return pid if pid and pid != old_pid else None

    new = await wait_until(replaced, timeout=timeout)
    assert new, f"{kind}-{index} (pid {old_pid}) was not restarted within {timeout}s\n" \
        + node.log_tail()
    await asyncio.to_thread(node.wait_ready, timeout)
    return new


def _tcp_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the server side of the TCP connection 127.0.0.1:local <- :remote."""
    row = tcp_row(local_port, remote_port, state="01")
    return row[9] if row else None


def gateway_of(node, nc) -> int | None:
    """The pid of the gateway process holding this nats-py connection's server socket."""
    try:
        port = nc._transport._io_writer.get_extra_info("sockname")[1]
    except Exception:  # noqa: BLE001 - nats-py internals: no answer rather than a crash
        return None
    inode = _tcp_inode(node.port, port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in node.pids("gateway"):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


class Sender:
    """Numbered acknowledged sends (``{"seq": n}``) to ``boxes``, from ``workers`` concurrent
    requesters. ``acked[seq] = (mail_id, priority, msg_id)``; ``failed`` counts the rest by
    reason. Several senders on one test use disjoint ``first_seq`` ranges; ``merge`` folds
    them into one for the delivery check."""

    def __init__(self, nc, boxes: list[str], *, timeout: float = 2.0, workers: int = 16,
                 prios=("normal", "normal", "urgent", "normal", "notify"), pad: int = 0,
                 first_seq: int = 0):
        self.nc = nc
        self.boxes = boxes
        self.timeout = timeout
        self.workers = workers
        self.prios = prios
        self.pad = "x" * pad
        self.seq = first_seq
        self.acked: dict[int, tuple[str, str, int]] = {}
        self.failed: Counter = Counter()
        self.sent = 0
        self.slowest = 0.0  # seconds, the longest any send waited for its answer
        self.stop = False

    async def send_one(self, mail_id: str | None = None, prio: str | None = None) -> bool:
        seq = self.seq
        self.seq += 1
        self.sent += 1
        mail_id = mail_id or self.boxes[seq % len(self.boxes)]
        prio = prio or self.prios[seq % len(self.prios)]
        body = {"seq": seq, "pad": self.pad} if self.pad else {"seq": seq}
        t0 = time.monotonic()
        try:
            r = await self.nc.request(f"$mq9.AI.INBOX.{mail_id}.{prio}", json.dumps(body).encode(),
                                      timeout=self.timeout)
        except NatsTimeout:
            self.failed["timeout"] += 1
            return False
        except Exception as e:  # noqa: BLE001 - connection closed, no responders...
            self.failed[type(e).__name__] += 1
            await asyncio.sleep(0.05)
            return False
        finally:
            self.slowest = max(self.slowest, time.monotonic() - t0)
        try:
            d = json.loads(r.data)
        except ValueError:
            self.failed[f"non-JSON reply {r.data[:60]!r}"] += 1
            return False
        if isinstance(d, dict) and isinstance(d.get("msg_id"), int):
            assert d.get("mail_id") == mail_id and d.get("priority") == prio, (mail_id, prio, d)
            self.acked[seq] = (mail_id, prio, d["msg_id"])
            return True
        self.failed[str(d.get("code") if isinstance(d, dict) else d)] += 1
        return False

    async def run(self, duration: float) -> None:
        deadline = time.monotonic() + duration

        async def worker():
            while not self.stop and time.monotonic() < deadline:
                if self.nc.is_closed:
                    return
                await self.send_one()

        await asyncio.gather(*[worker() for _ in range(self.workers)])

    def merge(self, *others: Sender) -> Sender:
        for o in others:
            self.acked.update(o.acked)
            self.failed.update(o.failed)
            self.sent += o.sent
            self.slowest = max(self.slowest, o.slowest)
        return self

    def acked_for(self, mail_id: str) -> dict[int, tuple[str, int]]:
        return {seq: (p, mid) for seq, (m, p, mid) in self.acked.items() if m == mail_id}

    def summary(self) -> str:
        return f"{self.sent} sends, {len(self.acked)} acked, not acked: {dict(self.failed)}"


def decode(msg) -> tuple[int, str, int | None]:
    """(seq, priority, msg_id) of a pushed message."""
    seq = json.loads(msg.data)["seq"]
    prio = msg.subject.rsplit(".", 1)[1]
    hdr = msg.headers or {}
    mid = hdr.get("Mq9-Msg-Id")
    if hdr.get("Mq9-Priority") not in (None, prio):
        raise AssertionError(f"Mq9-Priority {hdr.get('Mq9-Priority')} on {msg.subject}")
    return seq, prio, int(mid) if mid is not None else None


async def collect(nc, mail_id: str, expect: int, quiet: float = 0.5,
                  timeout: float = 15.0) -> list[tuple[int, str, int | None]]:
    """Subscribe as owner and take what is pushed: at least ``expect`` messages if they come,
    then until nothing more arrives for ``quiet`` seconds."""
    sub = await nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*")
    got = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(left, quiet if len(got) >= expect else 2.0)
            try:
                msg = await sub.next_msg(timeout=wait)
            except NatsTimeout:
                if len(got) >= expect:
                    break
                continue
            got.append(decode(msg))
    finally:
        await sub.unsubscribe()
    return got


def delivery_problems(mail_id: str, got, acked: dict[int, tuple[str, int]]) -> list[str]:
    """What is wrong with the messages ``got`` (delivery order) for the ``acked`` sends."""
    problems = []
    counts = Counter(seq for seq, _, _ in got)
    dups = {s: c for s, c in counts.items() if c > 1}
    if dups:
        problems.append(f"{mail_id}: {len(dups)} duplicated messages "
                        f"({sum(dups.values()) - len(dups)} extra copies), seq: "
                        f"{sorted(dups)[:20]}")
    missing = sorted(set(acked) - set(counts))
    if missing:
        problems.append(f"{mail_id}: {len(missing)} of {len(acked)} acked messages missing, "
                        f"seq: {missing[:20]}")
    first = {}
    for seq, prio, mid in got:
        first.setdefault(seq, (prio, mid))
    wrong = [(seq, acked[seq], first[seq]) for seq in acked if seq in first and first[seq] != acked[seq]]
    if wrong:
        problems.append(f"{mail_id}: {len(wrong)} messages delivered with another "
                        f"(priority, msg_id) than acked: {wrong[:5]}")
    ids = Counter(mid for seq, _, mid in {(s, p, m) for s, p, m in got})
    reused = {mid: n for mid, n in ids.items() if n > 1}
    if reused:
        problems.append(f"{mail_id}: msg_ids given to several messages: {sorted(reused)[:10]}")
    ranks = [PRIO_RANK[p] for _, p, _ in got]
    bad = [i for i in range(1, len(ranks)) if ranks[i] < ranks[i - 1]]
    if bad:
        i = bad[0]
        problems.append(f"{mail_id}: priority order broken at #{i}: {got[i - 1]} then {got[i]}")
    for prio in PRIO_RANK:
        mids = [mid for _, p, mid in got if p == prio]
        if any(m is None for m in mids):
            problems.append(f"{mail_id}: messages without Mq9-Msg-Id")
            break
        back = [i for i in range(1, len(mids)) if mids[i] <= mids[i - 1]]
        if back:
            i = back[0]
            problems.append(f"{mail_id}: {prio} msg_ids out of order at #{i}: "
                            f"{mids[max(0, i - 3):i + 3]}")
    return problems


async def check_all_delivered(nc, sender: Sender, boxes: list[str]) -> dict:
    """Owner-subscribe to each mailbox and check every acked message arrives exactly once,
    in order. Returns per-mailbox counts for the report."""
    problems, report = [], {}
    results = await asyncio.gather(*[collect(nc, m, len(sender.acked_for(m))) for m in boxes])
    for mail_id, got in zip(boxes, results):
        acked = sender.acked_for(mail_id)
        problems += delivery_problems(mail_id, got, acked)
        report[mail_id] = {"acked": len(acked), "delivered": len(got),
                           "stored_unacked": len({s for s, _, _ in got} - set(acked))}
    assert not problems, "\n".join(problems) + f"\n{sender.summary()}\n{report}"
    return report


def kill_whole_node(node) -> None:
    children = node.pids()
    assert children, "no child processes"
    node.kill()
    for pid in node.survivors(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert node.wait_gone(children) == [], "children outlived kill -9"


def tally(acked: dict[int, tuple[str, int]], got) -> tuple[list[int], dict[int, int], list]:
    """For messages ``got`` (any number of sessions, duplicates allowed) of one mailbox:
    (acked seqs never delivered, {seq: copies} of those delivered more than once, acked
    messages first delivered with another (priority, msg_id) than their ack said)."""
    counts = Counter(seq for seq, _, _ in got)
    first: dict[int, tuple[str, int | None]] = {}
    for seq, prio, mid in got:
        first.setdefault(seq, (prio, mid))
    lost = sorted(set(acked) - set(counts))
    dups = {s: c for s, c in counts.items() if c > 1}
    wrong = [(s, acked[s], first[s]) for s in acked if s in first and first[s] != acked[s]]
    return lost, dups, wrong


def tally_boxes(sender, got: dict) -> tuple[list, int, list, dict]:
    """``tally`` over every mailbox of ``got`` ({mail_id: messages}): (lost as (mail_id,
    seq), duplicate copies beyond the first, wrongly numbered, {mail_id: (acked, pushed,
    duplicated)})."""
    lost_all, dup_extra, wrong_all, per_box = [], 0, [], {}
    for m, msgs in got.items():
        lost, dups, wrong = tally(sender.acked_for(m), msgs)
        lost_all += [(m, s) for s in lost]
        wrong_all += wrong
        dup_extra += sum(dups.values()) - len(dups)
        per_box[m] = (len(sender.acked_for(m)), len(msgs), len(dups))
    return lost_all, dup_extra, wrong_all, per_box
