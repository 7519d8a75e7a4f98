"""The mesh between the gateways of one node: a PULL socket each, a PUSH to every other.

One PUSH socket per ordered pair keeps messages between two gateways in order, which the
interest protocol relies on (a ``PeerHello`` reset is followed by the full interest).
"""

from __future__ import annotations

import asyncio
import os

import zmq

from mq9 import endpoints, metrics, wire
from mq9.config import Config
from mq9.gateway.zsock import Outbox, watch


class Peers:
    def __init__(self, cfg: Config, index: int, ctx: zmq.Context, loop: asyncio.AbstractEventLoop):
        self.index = index
        self.others = [g for g in range(cfg.gateway_count) if g != index]
        self.loop = loop
        self.handler = None  # set by the gateway: on_peer_hello / on_interest / on_interest_ack / on_routed
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 100_000)
        addr = endpoints.gateway_endpoint(cfg, index)
        path = addr[len("ipc://"):]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a previous incarnation of this gateway
        self.pull.bind(addr)
        self.out: dict[int, Outbox] = {}
        for g in self.others:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.IMMEDIATE, 0)
            push.connect(endpoints.gateway_endpoint(cfg, g))
            self.out[g] = Outbox(push, loop)
        self._drain = None

    def start(self, handler) -> None:
        self.handler = handler
        self._drain = watch(self.loop, self.pull, self._on_frame)
        for g in self.others:
            self.send(g, wire.PeerHello(gw=self.index, want=True))

    def send(self, g: int, msg) -> None:
        box = self.out.get(g)
        if box is not None:
            box.put(msg)

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
            elif cls is wire.InterestAck:
                h.on_interest_ack(m)
            elif cls is wire.PeerHello:
                h.on_peer_hello(m)

    def close(self) -> None:
        for box in self.out.values():
            box.flush()
            box.sock.close(linger=100)
        self.loop.remove_reader(self.pull.getsockopt(zmq.FD))
        self.pull.close(linger=0)
