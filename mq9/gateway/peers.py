"""The mesh between the gateways of one node: a PULL socket each, a PUSH to every other.

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

import zmq

from mq9 import endpoints, metrics, wire
from mq9.config import Config
from mq9.gateway.zsock import Outbox, watch


class _PeerOutbox(Outbox):
    __slots__ = ("peers", "g")

    def flush(self) -> None:
        items = self.items
        if items and not all(m.__class__ is wire.Ack for m in items):
            p = self.peers
            p.sent[self.g] += 1
            items.append(wire.Mark(gw=p.index, seq=p.sent[self.g]))
        super().flush()


class Peers:
    def __init__(self, cfg: Config, index: int, ctx: zmq.Context, loop: asyncio.AbstractEventLoop,
                 barrier_timeout: float = 0.25):
        self.index = index
        self.others = [g for g in range(cfg.gateway_count) if g != index]
        self.loop = loop
        self.barrier_timeout = barrier_timeout
        self.handler = None  # the router: on_peer_hello / on_interest / on_routed
        self.sent = {g: 0 for g in self.others}  # last Mark seq sent to g
        self.acked = {g: 0 for g in self.others}  # last Mark seq g acknowledged
        self._acks_due: dict[int, int] = {}
        self._waiters: list[tuple[dict[int, int], float, object]] = []
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 100_000)
        addr = endpoints.gateway_endpoint(cfg, index)
        path = addr[len("ipc://"):]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a previous incarnation of this gateway
        self.pull.bind(addr)
        self.out: dict[int, _PeerOutbox] = {}
        for g in self.others:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(endpoints.gateway_endpoint(cfg, g))
            box = _PeerOutbox(push, loop)
            box.peers, box.g = self, g
            self.out[g] = box

    def start(self, handler) -> None:
        self.handler = handler
        watch(self.loop, self.pull, self._on_frame)
        for g in self.others:
            self.send(g, wire.PeerHello(gw=self.index, want=True))

    def send(self, g: int, msg) -> None:
        box = self.out.get(g)
        if box is not None:
            box.put(msg)

    # ---- barrier -----------------------------------------------------------------------

    def barrier(self, callback) -> None:
        """Call ``callback`` once every peer has handled every frame sent to it so far (or
        after ``barrier_timeout``, so a dead peer cannot stall a client's PING)."""
        for box in self.out.values():
            box.flush()  # what this loop turn queued counts as sent
        if self._caught_up(self.sent):
            callback()
            return
        self._waiters.append((dict(self.sent), time.monotonic() + self.barrier_timeout, callback))
        self.loop.call_later(self.barrier_timeout + 0.01, self._release)

    def _caught_up(self, sent: dict[int, int]) -> bool:
        acked = self.acked
        for g, seq in sent.items():
            if acked[g] < seq:
                return False
        return True

    def _release(self) -> None:
        if not self._waiters:
            return
        now = time.monotonic()
        keep = []
        for sent, deadline, cb in self._waiters:
            if now >= deadline or self._caught_up(sent):
                cb()
            else:
                keep.append((sent, deadline, cb))
        self._waiters = keep

    def _send_acks(self) -> None:
        due = self._acks_due
        self._acks_due = {}
        for g, seq in due.items():
            self.send(g, wire.Ack(gw=self.index, seq=seq))

    # ---- receiving ---------------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        try:
            msgs = wire.decode_peer(frame)
        except Exception:
            metrics.DROPS.labels("bad_frame").inc()
            return
        h = self.handler
        for m in msgs:
            cls = m.__class__
            if cls is wire.Routed:
                h.on_routed(m)
            elif cls is wire.Interest:
                h.on_interest(m)
            elif cls is wire.Mark:
                if not self._acks_due:
                    # After the client flushes queued by the deliveries above.
                    self.loop.call_soon(self._send_acks)
                self._acks_due[m.gw] = m.seq
            elif cls is wire.Ack:
                if m.gw in self.acked and m.seq > self.acked[m.gw]:
                    self.acked[m.gw] = m.seq
                    if self._waiters:
                        self._release()
            elif cls is wire.PeerHello:
                h.on_peer_hello(m)

    def close(self) -> None:
        for box in self.out.values():
            box.flush()
            box.sock.close(linger=100)
        self.loop.remove_reader(self.pull.getsockopt(zmq.FD))
        self.pull.close(linger=0)
