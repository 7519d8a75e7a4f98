"""The shard process: a ROUTER socket in front of one ``Shard`` (batch.py).

Each loop iteration is one batch: wait for input (or the next expiry tick), drain what is
queued without blocking, apply every operation, write one RocksDB WriteBatch, then send one
frame per gateway. Replies and pushes therefore never precede the write that makes them
true, and a burst of sends costs one WAL append.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import zmq
from prometheus_client import Counter

from mq9 import api, curve, endpoints, log, metrics, process, wire
from mq9 import reload as reloading
from mq9.config import Config
from mq9.shard.batch import Shard
from mq9.shard.core import Outputs
from mq9.shard.store import Store

TICK = 0.25  # expiry checks at least this often (seconds)
PROBE_EVERY = 1.0  # while writes fail, how often to test whether the disk takes them again
MAX_FRAMES = 512  # frames drained into one batch; each frame already holds many ops


def data_path(cfg: Config, index: int) -> str:
    return os.path.join(cfg.data_dir, f"shard-{index}")


def _remove_stale_socket(cfg: Config, index: int) -> None:
    """Called once the RocksDB lock is ours, which proves the file's owner is dead. Done
    before the (possibly long) load: the socket file's existence is the readiness signal."""
    path = endpoints.shard_endpoint(cfg, index)[len("ipc://"):]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind(cfg: Config, index: int, ctx: zmq.SyncContext) -> zmq.SyncSocket:
    """The ROUTER, on this node's ipc endpoint and, in cluster mode, on ``--host`` at the
    shard's TCP port behind CURVE (``mq9.curve``; the caller runs the authenticator)."""
    sock = ctx.socket(zmq.ROUTER)
    # Unknown identity -> EHOSTUNREACH instead of a silent drop, so a vanished gateway's
    # in-flight messages go back to pending at once.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A restarted gateway reconnects under its old name before the dead pipe is reaped.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    # Never drop a reply or push for a slow gateway: the per-mailbox window bounds pushes.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.bind(endpoints.shard_endpoint(cfg, index))
    if cfg.cluster_port and cfg.cluster_secret:
        port = endpoints.shard_tcp_port(cfg.cluster_port, index)
        try:
            # Gateways and movers of other nodes reach this shard here.
            curve.server(sock, cfg.cluster_secret)
            sock.bind(f"tcp://{cfg.host}:{port}")
        except zmq.ZMQError as e:
            log.error("shard_tcp_bind_failed", shard=index, port=port, error=str(e))
    return sock


class _Metrics:
    """Metric updates once per batch, with label children looked up once."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], Counter] = {}
        self.bad_frame = metrics.DROPS.labels("bad_frame")
        self.unreachable = metrics.DROPS.labels("gateway_unreachable")
        self.corrupt = metrics.DROPS.labels("corrupt_record")
        self._corrupt_seen = 0
        self._next_size = 0.0

    def batch(self, shard: Shard, seconds: float, nops: int) -> None:
        for key, n in shard.take_op_counts().items():
            c = self.ops.get(key)
            if c is None:
                c = self.ops[key] = metrics.MAILBOX_OPS.labels(*key)
            c.inc(n)
        metrics.MAILBOXES.set(len(shard.mailboxes))
        metrics.STORED_MESSAGES.set(shard.total_msgs)
        metrics.STORED_BYTES.set(shard.total_bytes)
        if shard.corrupt != self._corrupt_seen:
            self.corrupt.inc(shard.corrupt - self._corrupt_seen)
            self._corrupt_seen = shard.corrupt
        if nops:
            metrics.SHARD_BATCH_SECONDS.observe(seconds)
            metrics.SHARD_BATCH_SIZE.observe(nops)
        now = time.monotonic()
        if now >= self._next_size:
            # RocksDB computes these from its own bookkeeping: cheap, but not per batch.
            self._next_size = now + 5.0
            metrics.ROCKSDB_BYTES.set(shard.store.disk_bytes())


def _encode(items: list[wire.FromShard]) -> bytes:
    """One frame for a gateway. An item that cannot be encoded (a value msgpack cannot
    hold) must not take the others down, nor the shard: it becomes an ``internal`` error
    for its request, or is dropped if it is a push."""
    try:
        return wire.encode(items)
    except (OverflowError, UnicodeEncodeError, TypeError):
        good: list[wire.FromShard] = []
        for it in items:
            try:
                wire.encode([it])
                good.append(it)
            except (OverflowError, UnicodeEncodeError, TypeError):
                log.error("shard_unencodable_reply", kind=type(it).__name__)
                if isinstance(it, wire.ANSWERS):
                    good.append(wire.Result(rid=it.rid, code=api.Code.INTERNAL, error=api.UNENCODABLE))
        return wire.encode(good)


def tick_delay(now: float, next_expiry: float | None) -> float:
    """Seconds until the next expiry check: at the latest after TICK, sooner if a mailbox's
    wall-clock deadline comes first (never less than 10 ms)."""
    if next_expiry is None:
        return TICK
    return min(TICK, max(next_expiry - now, 0.01))


def _write_failed(shard: Shard, index: int, error: Exception, sock: zmq.SyncSocket) -> Outputs:
    """A batch's RocksDB write failed (disk full, read-only dir, I/O error). Its requests
    are answered ``unavailable`` (nothing of it was stored, so nothing may be acked or
    pushed), memory is rebuilt from what RocksDB holds, and until a probe write succeeds
    the shard refuses sends, creates and deletes but keeps serving reads and deliveries.
    The process stays up: a restart would not make the disk writable, and a crash loop
    would take the reads down too."""
    log.error("shard_write_failed", shard=index, error=str(error))
    for gw, items in shard.failed_outputs().items():
        try:
            sock.send_multipart([gw, wire.encode(items)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    shard.storage_error = str(error)
    metrics.STORAGE_FAILING.set(1)
    shard.reload()
    log.info("shard_reloaded", shard=index, mailboxes=len(shard.mailboxes),
             messages=shard.total_msgs)
    return {}


def _reload_log_level(cfg: Config) -> None:
    try:
        doc = reloading.read(cfg.run_dir)
        if doc is not None:
            log.set_level(doc.log_level)
            log.info("config_reloaded", generation=doc.generation, log_level=doc.log_level)
    except Exception as e:  # noqa: BLE001 - a bad reload must never take the shard down
        log.error("reload_failed", error=str(e), hint="this shard keeps its log level")


def run(cfg: Config, index: int) -> None:
    """Serve shard ``index`` until SIGTERM/SIGINT; then finish the batch, flush, close."""
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    # A file-size limit (RLIMIT_FSIZE) must fail RocksDB's write with EFBIG, which the loop
    # handles, not kill the process with the default action of SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Under the supervisor SIGINT is ignored on purpose (Ctrl-C becomes an ordered stop by
    # SIGTERM, gateways before shards); only a shard run on its own stops on Ctrl-C.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop)
    # A shard's only reloadable setting is its log level (see mq9/reload.py).
    signal.signal(signal.SIGHUP, lambda signum, frame: _reload_log_level(cfg))
    reloading.accept(signal.SIGHUP)

    t0 = time.monotonic()
    store = Store(data_path(cfg, index), fsync=cfg.fsync == "batch")
    _remove_stale_socket(cfg, index)
    shard = Shard(store, max_msgs=cfg.max_msgs)
    shard.load()
    log.info("shard_loaded", shard=index, mailboxes=len(shard.mailboxes),
             messages=shard.total_msgs, seconds=round(time.monotonic() - t0, 3))
    process.settle_heap()

    ctx: zmq.SyncContext = zmq.Context(1)
    # No secret, no TCP port (the supervisor refuses cluster mode without one anyway).
    secret = cfg.cluster_secret if cfg.cluster_port else None
    auth = curve.start_authenticator(ctx, secret) if secret else None
    sock = _bind(cfg, index, ctx)
    m = _Metrics()
    m.batch(shard, 0.0, 0)
    recv = sock.recv_multipart
    send = sock.send_multipart
    decode = wire.decode_to_shard
    apply = shard.apply
    NOBLOCK = zmq.NOBLOCK
    # Ticks run on the monotonic clock; TTL deadlines are wall-clock instants compared with
    # time.time() at each tick. A wall-clock step can then only move an expiry by the size
    # of the step, never stop the ticks (as a deadline kept in wall-clock time would).
    next_tick = 0.0
    next_probe = 0.0
    try:
        while not stopping:
            if shard.dirty:
                timeout = 0
            else:
                timeout = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            frames: list[list[bytes]] = []
            if sock.poll(timeout, zmq.POLLIN):
                while len(frames) < MAX_FRAMES:
                    try:
                        frames.append(recv(NOBLOCK))
                    except zmq.Again:
                        break
            mono = time.monotonic()
            if shard.storage_error is not None and mono >= next_probe:
                next_probe = mono + PROBE_EVERY
                if store.writable():
                    shard.storage_error = None
                    metrics.STORAGE_FAILING.set(0)
                    log.info("shard_storage_recovered", shard=index)
            tick = mono >= next_tick
            if not frames and not tick and not shard.dirty:
                continue
            now = time.time()
            started = time.perf_counter()
            shard.begin(now)
            nops = 0
            for parts in frames:
                if len(parts) != 2:
                    m.bad_frame.inc()
                    continue
                try:
                    ops = decode(parts[1])
                except Exception:  # noqa: BLE001 - msgspec raises several kinds
                    m.bad_frame.inc()
                    continue
                gw = parts[0]
                for op in ops:
                    apply(gw, op)
                nops += len(ops)
            if tick:
                shard.expire()
                next_tick = mono + tick_delay(now, shard.next_expiry())
            try:
                out = shard.finish()
            except Exception as e:  # noqa: BLE001 - rocksdict raises plain Exception
                metrics.STORAGE_ERRORS.inc()
                if shard.storage_error is not None:
                    out = shard.discard_failed_write()
                else:
                    out = _write_failed(shard, index, e, sock)
                    next_probe = time.monotonic() + PROBE_EVERY
            for gw, items in out.items():
                try:
                    send([gw, _encode(items)], NOBLOCK)
                except zmq.ZMQError as e:
                    # Gone (EHOSTUNREACH) or, without a HWM, not expected at all: either way
                    # that gateway's subscriptions are dead and their messages go back.
                    if e.errno != zmq.EHOSTUNREACH:
                        log.warning("shard_send_failed", shard=index, gateway=gw, error=str(e))
                    m.unreachable.inc(sum(len(it.msg_ids) for it in items
                                            if type(it) is wire.DeliverRun))
                    shard.drop_gateway(gw)
            m.batch(shard, time.perf_counter() - started, nops)
    finally:
        try:
            store.close()
        finally:
            sock.close()
            if auth is not None:
                auth.stop()
            ctx.term()
        log.info("shard_stopped", shard=index)
