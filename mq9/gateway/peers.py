"""The mesh between gateways: a PULL socket each, a PUSH to every other gateway of the
cluster (this node's over ipc, other nodes' over TCP).

One PUSH socket per ordered pair keeps messages between two gateways in order, which the
interest protocol relies on (a ``PeerHello`` reset is followed by the full interest).

Every frame that carries more than acks ends with a numbered ``Mark``; the receiver answers
``Ack`` after handling the frame (its deliveries are already queued to its clients, and the
ack leaves after they are written). ``barrier`` runs a callback once every peer has acked
all frames sent so far: a client's PING is answered through it, so after "publish, flush"
every subscriber on every gateway has the messages, and after "subscribe, flush" every
gateway knows the interest — as with a single nats-server.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import zmq

from mq9 import curve, endpoints, log, metrics, wire
from mq9.config import Config
from mq9.gateway.zsock import Outbox, Socket, watch

STALLED_WAIT = 0.02  # seconds a barrier waits for a peer that timed out before


class PeerHandler(Protocol):
    """What the mesh hands over (the gateway's ``Router``)."""

    def on_peer_hello(self, hello: wire.PeerHello) -> None: ...
    def on_interest(self, msg: wire.Interest) -> None: ...
    def on_routed(self, msg: wire.Routed) -> None: ...
    def on_routed_run(self, msg: wire.RoutedRun) -> None: ...
    def on_peer_gone(self, g: str) -> None: ...


class _Waiter(NamedTuple):
    """A barrier not yet passed: what had been sent to each peer, since when, and then what."""

    sent: dict[str, int]
    t0: float
    callback: Callable[[], None]


class _PeerOutbox(Outbox[wire.PeerMsg]):
    __slots__ = ("peers", "g")

    def __init__(self, sock: Socket, loop: asyncio.AbstractEventLoop, peers: Peers, g: str):
        super().__init__(sock, loop)
        self.peers = peers
        self.g = g

    def flush(self) -> None:
        items = self.items
        if items and not all(m.__class__ is wire.Ack for m in items):
            p = self.peers
            p.sent[self.g] += 1
            items.append(wire.Mark(gw=p.me, seq=p.sent[self.g]))
        super().flush()


class Peers:
    handler: PeerHandler  # set by start

    def __init__(self, cfg: Config, me: str, index: int, ctx: zmq.Context[Socket],
                 loop: asyncio.AbstractEventLoop, barrier_timeout: float = 0.25):
        self.me = me  # this gateway's cluster-wide id, "node/index"
        self.ctx = ctx
        self.loop = loop
        self.barrier_timeout = barrier_timeout
        self.out: dict[str, _PeerOutbox] = {}
        self.endpoints: dict[str, str] = {}
        self.sent: dict[str, int] = {}  # last Mark seq sent to g
        self.acked: dict[str, int] = {}  # last Mark seq g acknowledged
        self._acks_due: dict[str, int] = {}
        self._waiters: list[_Waiter] = []
        # Peers that let a barrier time out: left out of barriers until they ack again,
        # so a dead node costs one slow PING, not a slow PING per client per flush.
        self.stalled: set[str] = set()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 100_000)
        addr = endpoints.gateway_endpoint(cfg, index)
        path = addr[len("ipc://"):]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a previous incarnation of this gateway
        self.pull.bind(addr)
        self.secret = cfg.cluster_secret
        self.auth = None
        if cfg.cluster_port and self.secret:  # no secret, no TCP port
            port = endpoints.gateway_tcp_port(cfg.cluster_port, cfg.shards, index)
            self.auth = curve.start_authenticator(ctx, self.secret)
            try:
                curve.server(self.pull, self.secret)  # after the ipc bind: that one stays plain
                self.pull.bind(f"tcp://{cfg.host}:{port}")
            except zmq.ZMQError as e:
                # This node stays usable alone; other nodes cannot reach this gateway.
                log.error("gateway_mesh_bind_failed", port=port, error=str(e))

    @property
    def others(self) -> list[str]:
        return list(self.out)

    def start(self, handler: PeerHandler, peers: dict[str, str]) -> None:
        self.handler = handler
        watch(self.loop, self.pull, self._on_frame)
        self.update(peers)

    def update(self, peers: dict[str, str]) -> None:
        """Connect to gateways that appeared, drop those that left (``peers``: id -> endpoint,
        this gateway included or not)."""
        for g in [g for g in self.out if g not in peers or peers[g] != self.endpoints[g]]:
            box = self.out.pop(g)
            box.sock.close(linger=0)
            self.sent.pop(g, None)
            self.acked.pop(g, None)
            self.stalled.discard(g)
            self.endpoints.pop(g, None)
            self.handler.on_peer_gone(g)
        for g, ep in peers.items():
            if g == self.me or g in self.out:
                continue
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.setsockopt(zmq.LINGER, 0)
            curve.connect(push, ep, self.secret)
            box = _PeerOutbox(push, self.loop, self, g)
            self.out[g] = box
            self.endpoints[g] = ep
            self.sent[g] = 0
            self.acked[g] = 0
            self.send(g, wire.PeerHello(gw=self.me, want=True))
        if self._waiters:
            self._release()

    def send(self, g: str, msg: wire.PeerMsg) -> None:
        box = self.out.get(g)
        if box is not None:
            box.put(msg)

    async def wait_acked(self, gs: list[str], timeout: float) -> list[str]:
        """Wait until each peer of ``gs`` has acked a frame of this gateway (at the latest
        its answer to our ``PeerHello``); returns those that had not within ``timeout``.

        An ack proves both directions carry frames and that the peer handled our hello,
        and ours the full interest it sent back before the ack. Until then a barrier
        could only time out on that peer (and mark it stalled), so "subscribe, flush"
        would not mean that the peer knows the interest.
        """
        deadline = self.loop.time() + timeout
        while True:
            missing = [g for g in gs if self.acked.get(g) == 0]
            if not missing or self.loop.time() >= deadline:
                return missing
            await asyncio.sleep(0.01)  # start-up only: polling keeps the Ack path as it is

    # ---- barrier -----------------------------------------------------------------------

    def barrier(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every peer has handled every frame sent to it so far.

        A peer that let an earlier barrier time out (``stalled``) is waited for only
        ``STALLED_WAIT``, any other for ``barrier_timeout``: a dead peer then costs one slow
        PING, not one per flush, while a live peer that was merely late (say, it learnt of
        this gateway after its first hello) is still waited for.
        """
        for box in self.out.values():
            box.flush()  # what this loop turn queued counts as sent
        if self._caught_up(self.sent, skip_stalled=False):
            callback()
            return
        self._waiters.append(_Waiter(dict(self.sent), time.monotonic(), callback))
        self.loop.call_later(STALLED_WAIT, self._release)
        self.loop.call_later(self.barrier_timeout + 0.001, self._release)

    def _caught_up(self, sent: dict[str, int], skip_stalled: bool) -> bool:
        acked = self.acked
        for g, seq in sent.items():
            if g in acked and acked[g] < seq and not (skip_stalled and g in self.stalled):
                return False
        return True

    def _release(self) -> None:
        if not self._waiters:
            return
        now = time.monotonic()
        keep = []
        for sent, t0, cb in self._waiters:
            waited = now - t0
            if self._caught_up(sent, skip_stalled=waited >= STALLED_WAIT):
                cb()
            elif waited >= self.barrier_timeout:
                behind = {g for g, seq in sent.items() if g in self.acked and self.acked[g] < seq}
                if behind - self.stalled:
                    log.warning("gateway_peers_stalled", peers=",".join(sorted(behind - self.stalled)))
                self.stalled |= behind
                cb()
            else:
                keep.append(_Waiter(sent, t0, cb))
        self._waiters = keep

    def _send_acks(self) -> None:
        due = self._acks_due
        self._acks_due = {}
        for g, seq in due.items():
            self.send(g, wire.Ack(gw=self.me, seq=seq))

    # ---- receiving ---------------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        try:
            msgs: list[wire.PeerMsg] = wire.decode_peer(frame)
        except Exception:
            metrics.DROPS.labels("bad_frame").inc()
            return
        h = self.handler
        for m in msgs:
            # type(m) in each test, not once in a local: that is what mypy narrows m by
            if type(m) is wire.Routed:
                h.on_routed(m)
            elif type(m) is wire.RoutedRun:
                h.on_routed_run(m)
            elif type(m) is wire.Interest:
                # Also from a gateway this one has not learnt of yet: its interest counts
                # now; the hello exchange once we know it resets and resends it whole.
                h.on_interest(m)
            elif type(m) is wire.Mark:
                if not self._acks_due:
                    # After the client flushes queued by the deliveries above.
                    self.loop.call_soon(self._send_acks)
                self._acks_due[m.gw] = m.seq
            elif type(m) is wire.Ack:
                if m.gw in self.acked and m.seq > self.acked[m.gw]:
                    self.acked[m.gw] = m.seq
                    self.stalled.discard(m.gw)
                    if self._waiters:
                        self._release()
            elif type(m) is wire.PeerHello:
                # A peer that says hello is up (again, after a restart): barriers wait for
                # it fully from now on, not just STALLED_WAIT as for the dead process.
                self.stalled.discard(m.gw)
                if m.gw in self.out:
                    h.on_peer_hello(m)

    def close(self) -> None:
        for box in self.out.values():
            box.flush()
            box.sock.close(linger=100)
        self.loop.remove_reader(self.pull.fileno())
        self.pull.close(linger=0)
        if self.auth is not None:
            self.auth.stop()  # before the context ends: its ZAP socket would block term()
