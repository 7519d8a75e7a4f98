"""The shard process end to end: a real ZeroMQ DEALER speaking wire structs to
``server.run`` in a spawned child, including kill -9 and restart, and a slot moved between
two shard processes (the shard side of moves, in one process, is mq9/shard/move_test.py)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time

import pytest
import zmq

from mq9 import endpoints, subjects, wire
from mq9.cluster.slots import slot_of
from mq9.config import Config
from mq9.shard import server
from mq9.shard.mailbox_test import Pushed, pushed
from mq9.shard.store import Store

TOK = hashlib.sha256(b"tok-test").digest()
ALL = subjects.ALL_PRIORITIES
PRIOS = subjects.PRIORITIES
_ctx = multiprocessing.get_context("spawn")


class ShardProc:
    def __init__(self, cfg: Config, index: int = 0):
        self.cfg = cfg
        self.index = index
        self.proc = None

    def start(self):
        self.proc = _ctx.Process(target=server.run, args=(self.cfg, self.index), daemon=True)
        self.proc.start()

    def kill9(self):
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # already gone (and reaped)
        self._wait(5)

    def stop(self) -> int:
        """SIGTERM and wait; the exit code. A child reaped by someone else in this process
        (a library's SIGCHLD handler that waits for any child) counts as a clean exit: its
        status is lost, and multiprocessing would otherwise think it runs forever."""
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return self.proc.exitcode if self.proc.exitcode is not None else 0
        if not self._wait(10):
            self.kill9()
        return self.proc.exitcode if self.proc.exitcode is not None else 0

    def gone(self) -> bool:
        if not self.proc.is_alive():
            return True
        try:
            os.kill(self.proc.pid, 0)
        except ProcessLookupError:
            return True  # reaped elsewhere: it has exited
        return False

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gone():
                return True
            time.sleep(0.02)
        return False


class Gateway:
    """A stand-in for a gateway: one DEALER, replies sorted into results and delivers."""

    def __init__(self, cfg: Config, name: bytes = b"gw-test", index: int = 0):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoints.shard_endpoint(cfg, index))
        self.rid = 0
        self.results: dict[int, wire.Result] = {}
        self.delivers: list[Pushed] = []

    def close(self):
        self.sock.close()

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def post(self, *ops):
        self.sock.send(wire.encode(list(ops)))

    def read(self, timeout_ms: int) -> bool:
        if not self.sock.poll(timeout_ms):
            return False
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            for item in wire.decode_from_shard(frame):
                if isinstance(item, wire.ANSWERS):
                    self.results[item.rid] = item
                else:
                    self.delivers.extend(pushed([item]))

    def wait(self, rid: int, timeout: float = 15.0) -> wire.Result:
        deadline = time.monotonic() + timeout
        while rid not in self.results:
            left = deadline - time.monotonic()
            assert left > 0, f"no answer for rid {rid}"
            self.read(int(left * 1000) + 1)
        return self.results.pop(rid)

    def call(self, op, timeout: float = 15.0) -> wire.Result:
        self.post(op)
        return self.wait(op.rid, timeout)

    def create(self, mail_id: str, ttl: int = 0, type: str = "standard") -> wire.Result:
        return self.call(wire.Create(self.next_rid(), mail_id, type, ttl, TOK))

    def send(self, mail_id: str, prio: str = "normal", payload: bytes = b"x") -> wire.Send:
        return wire.Send(self.next_rid(), mail_id, prio, f"$mq9.AI.INBOX.{mail_id}.{prio}", payload)

    def drain_delivers(self, quiet_ms: int = 300) -> list[Pushed]:
        """Collect pushes, acknowledging each batch like a gateway, until the shard is quiet."""
        got = []
        while self.delivers or self.read(quiet_ms):
            batch, self.delivers = self.delivers, []
            got.extend(batch)
            by_key: dict[tuple[int, str], list[int]] = {}
            for d in batch:
                by_key.setdefault((d.key, d.mail_id), []).append(d.msg_id)
            if by_key:
                self.post(*[wire.Delivered(k, m, ids) for (k, m), ids in by_key.items()])
        return got


@pytest.fixture
def cfg(tmp_path):
    return Config(data_dir=str(tmp_path / "data"), max_msgs=100_000)


@pytest.fixture
def shard(cfg):
    p = ShardProc(cfg)
    p.start()
    yield p
    p.stop()


def test_kill9_keeps_every_acked_send_and_replays_in_order(cfg, shard):
    gw = Gateway(cfg)
    try:
        gw.post(wire.Hello())
        assert gw.create("victim").code is None
        acked: dict[int, str] = {}  # msg_id -> priority
        rids: dict[int, str] = {}
        sent = 0

        def post_frame():
            nonlocal sent
            ops = [gw.send("victim", PRIOS[(sent + i) % 3], b"m%d" % (sent + i)) for i in range(100)]
            for op in ops:
                rids[op.rid] = op.priority
            gw.post(*ops)
            sent += len(ops)

        def collect():
            for rid in [r for r in gw.results if r in rids]:
                res = gw.results.pop(rid)
                assert res.code is None, res
                acked[res.data["msg_id"]] = rids.pop(rid)

        while len(acked) < 3000:
            post_frame()
            gw.read(0)
            collect()
            if sent - len(acked) > 2000:
                gw.read(50)
        for _ in range(30):  # a burst the shard is still chewing on when it dies
            post_frame()
        shard.kill9()
        gw.read(100)  # answers that made it out before the kill count as acknowledged too
        collect()
        assert sent > len(acked)
    finally:
        gw.close()

    shard.start()
    gw = Gateway(cfg)
    try:
        q = gw.call(wire.Query(gw.next_rid(), "victim", TOK, 1, False))  # waits for the restart
        assert q.data["unread"] >= len(acked)
        gw.post(wire.Hello(), wire.Subscribe(1, "victim", ALL))
        got = gw.drain_delivers()
        ids = [d.msg_id for d in got]
        assert len(ids) == len(set(ids)), "duplicates in replay"
        assert set(acked) <= set(ids), f"lost {len(set(acked) - set(ids))} acknowledged sends"
        order = [(PRIOS.index(d.priority), d.msg_id) for d in got]
        assert order == sorted(order), "replay is not urgent, normal, notify, oldest first"
        # msg_ids continue after the highest one that survived.
        res = gw.call(gw.send("victim"))
        assert res.data["msg_id"] == max(ids) + 1
        # Delivered reports were stored: a Query finds only the one live message unread.
        gw.drain_delivers()
        q = gw.call(wire.Query(gw.next_rid(), "victim", TOK, 10, False))
        assert q.code is None and q.data["unread"] == 0
    finally:
        gw.close()


def test_ttl_expiry_live_and_while_down(cfg, shard):
    gw = Gateway(cfg)
    try:
        t0 = time.time()
        assert gw.create("soon", ttl=1).code is None
        assert gw.create("forever", ttl=0).code is None
        for m in ("soon", "forever"):
            assert gw.call(gw.send(m)).code is None
        gw.post(wire.Subscribe(1, "soon", ALL))
        assert [d.msg_id for d in gw.drain_delivers(100)] == [1]
        while gw.call(gw.send("soon")).code is None:
            time.sleep(0.05)
        elapsed = time.time() - t0
        assert elapsed < 2.5, f"mailbox with ttl=1 lived {elapsed:.2f}s"  # TTL + ~1 s + slack for a busy CI
        q = gw.call(wire.Query(gw.next_rid(), "soon", TOK, 10, False))
        assert q.code == "not_found" and q.error

        # Expires while the shard is down: gone after the restart, from disk too.
        assert gw.create("down", ttl=1).code is None
        assert gw.call(gw.send("down", payload=b"lost")).code is None
        shard.kill9()
        time.sleep(1.1)
        shard.start()
        q = gw.call(wire.Query(gw.next_rid(), "down", TOK, 10, False))
        assert q.code == "not_found"
        q = gw.call(wire.Query(gw.next_rid(), "forever", TOK, 10, False))
        assert q.code is None and q.data["unread"] == 1
    finally:
        gw.close()
    assert shard.stop() == 0
    st = Store(server.data_path(cfg, 0))
    try:
        keys = list(st.db.keys())
        assert not [k for k in keys if b"down" in k or b"soon" in k], keys
        assert b"M\0forever" in keys
    finally:
        st.close()


def test_bad_frames_and_sigterm(cfg, shard):
    gw = Gateway(cfg)
    try:
        gw.sock.send(b"\xc1garbage")
        gw.sock.send_multipart([b"two", b"frames"])
        gw.sock.send(wire.encode([wire.Hello()])[:-1] + b"\xff")
        assert gw.create("alive").code is None
        bad = wire.Query(gw.next_rid(), "alive", TOK, 5000, False)
        assert gw.call(bad).code == "bad_request"
    finally:
        gw.close()
    assert shard.stop() == 0
    assert shard.gone()


def test_throughput_pipelined_sends(cfg, shard, capsys):
    gw = Gateway(cfg)
    try:
        assert gw.create("bench").code is None
        payload = os.urandom(128).hex().encode()  # 256 B
        n_total, per_frame, window = 60_000, 100, 1000
        sent = acked = 0
        t0 = time.perf_counter()
        while acked < n_total:
            while sent < n_total and sent - acked < window:
                gw.post(*[wire.Send(sent + i + 1, "bench", "normal", "$mq9.AI.INBOX.bench.normal", payload)
                          for i in range(per_frame)])
                sent += per_frame
            gw.read(1000)
            acked += len(gw.results)
            gw.results.clear()
        rate = n_total / (time.perf_counter() - t0)
    finally:
        gw.close()
    with capsys.disabled():
        print(f"\n[shard] acked sends/s, 1 DEALER, {window} outstanding, {per_frame}/frame, 256 B: {rate:,.0f}")
    assert rate > 5000


def test_vanished_gateway_messages_go_to_the_other_queue_member(cfg, shard):
    a = Gateway(cfg, b"gw-a")
    b = Gateway(cfg, b"gw-b")
    try:
        assert a.create("work").code is None
        a.post(wire.Subscribe(1, "work", ALL, "q"))
        b.post(wire.Subscribe(2, "work", ALL, "q"))
        assert b.create("sync").code is None  # both subscriptions are registered now
        a.close()
        time.sleep(1.0)  # let the shard's ROUTER see the pipe close (slow on a busy machine)
        for _ in range(10):
            assert b.call(b.send("work")).code is None
        got = b.drain_delivers()
        assert sorted(d.msg_id for d in got) == list(range(1, 11))
    finally:
        b.close()


def test_tick_delay_follows_deadlines_and_survives_wall_clock_steps():
    """The expiry tick is scheduled on the monotonic clock from this delay: never longer
    than TICK, so a wall clock stepped back (deadline far ahead) does not stop the ticks,
    and never 0, so one stepped forward (deadline passed) does not spin."""
    assert server.tick_delay(1000.0, None) == server.TICK
    assert server.tick_delay(1000.0, 1000.1) == pytest.approx(0.1)
    assert server.tick_delay(1000.0, 1000.0 + 3600) == server.TICK
    assert server.tick_delay(1000.0, 10.0) == 0.01


def test_move_between_shard_processes(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "data"))
    src, dst = ShardProc(cfg, 0), ShardProc(cfg, 1)
    src.start()
    dst.start()
    gw0, gw1 = Gateway(cfg, b"gw", 0), Gateway(cfg, b"gw", 1)
    mv0, mv1 = Gateway(cfg, b"mover-n1", 0), Gateway(cfg, b"mover-n1", 1)
    try:
        assert gw0.create("alpha").code is None
        sent = [gw0.call(gw0.send("alpha", "normal", b"m%d" % i)).data["msg_id"] for i in range(50)]
        slots = [slot_of("alpha")]

        def copy(max_bytes):
            after, pages = None, []
            while True:
                res = mv0.call(wire.Export(mv0.next_rid(), slots, after, max_bytes))
                assert res.code is None, res
                pages.append(res.data["pairs"])
                after = res.data["next"]
                if after is None:
                    break
            for i, page in enumerate(pages):
                res = mv1.call(wire.Import(mv1.next_rid(), slots, page, reset=i == 0,
                                           done=i == len(pages) - 1))
                assert res.code is None, res
            return len(pages)

        assert copy(300) > 3  # copy phase, the source keeps serving
        assert gw0.call(gw0.send("alpha", "urgent", b"during")).code is None
        assert mv0.call(wire.Freeze(mv0.next_rid(), slots)).code is None
        assert gw0.call(gw0.send("alpha")).code == "moved"
        # A subscription at the target before the flip: the copy already loaded there is
        # pumped, and again after the flip's reset (at least once, never lost).
        gw1.post(wire.Subscribe(1, "alpha", ALL))
        copy(1 << 20)  # flip phase
        assert mv0.call(wire.Drop(mv0.next_rid(), slots)).data["dropped"] == 1

        got = gw1.drain_delivers()
        want = [b"during"] + [b"m%d" % i for i in range(50)]
        assert {d.payload for d in got} == set(want)
        assert [d.payload for d in got][-len(want):] == want  # the flipped copy, in order
        q = gw1.call(wire.Query(gw1.next_rid(), "alpha", TOK, 10, False))
        assert q.data["unread"] == 0  # Delivered reports reached the new owner
        assert gw1.call(gw1.send("alpha")).data["msg_id"] == max(sent) + 2
        src.stop()
        src.start()
        q = gw0.call(wire.Query(gw0.next_rid(), "alpha", TOK, 1, False))
        assert q.code == "moved"
    finally:
        for g in (gw0, gw1, mv0, mv1):
            g.close()
        src.stop()
        dst.stop()
