"""The gateway's side of the gateway <-> shard link: one DEALER per shard.

Requests carry a gateway-unique ``rid``; the answer (``Result``) finds its callback here. A
request unanswered within ``timeout`` is answered locally with ``unavailable`` so a client
never waits forever on a dead or stopped shard. When a shard (re)connects, ZeroMQ's monitor
tells us and the gateway re-registers its owner subscriptions there.
"""

from __future__ import annotations

import asyncio
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from cluster.slots import SlotMap
from mq9 import endpoints, metrics, wire
from mq9.config import Config
from mq9.gateway.zsock import Outbox, watch


class ShardLink:
    def __init__(self, cfg: Config, gw_index: int, ctx: zmq.Context, loop: asyncio.AbstractEventLoop,
                 timeout: float = 5.0):
        self.loop = loop
        self.timeout = timeout
        self.slots = SlotMap(cfg.shards)
        self.identity = f"gw-{gw_index}".encode()
        self.handler = None  # on_deliver(Deliver), on_shard_connected(index)
        self.pending: dict[int, tuple[float, object]] = {}
        self._rid = 0
        self.socks: list[zmq.Socket] = []
        self.out: list[Outbox] = []
        self._monitors: list[zmq.Socket] = []
        for i in range(cfg.shards):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, self.identity)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 50)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            self._monitors.append(s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
            s.connect(endpoints.shard_endpoint(cfg, i))
            self.socks.append(s)
            self.out.append(None)  # filled in start(): the drain function must exist first
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, handler) -> None:
        self.handler = handler
        for i, s in enumerate(self.socks):
            drain = watch(self.loop, s, self._on_frame)
            self.out[i] = Outbox(s, self.loop, after_send=drain)
            mon = self._monitors[i]
            self.loop.add_reader(mon.getsockopt(zmq.FD), self._on_monitor, i)
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def shard_of(self, mail_id: str) -> int:
        return self.slots.shard_for(mail_id)

    def post(self, shard: int, op) -> None:
        self.out[shard].put(op)

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def request(self, shard: int, op, callback) -> None:
        """``op.rid`` must come from ``next_rid``; ``callback(Result)`` is called once."""
        self.pending[op.rid] = (time.monotonic() + self.timeout, callback)
        self.out[shard].put(op)

    def _on_frame(self, frame: bytes) -> None:
        try:
            msgs = wire.decode_from_shard(frame)
        except Exception:
            metrics.DROPS.labels("bad_frame").inc()
            return
        for m in msgs:
            if m.__class__ is wire.Deliver:
                self.handler.on_deliver(m)
            else:
                entry = self.pending.pop(m.rid, None)
                if entry is not None:
                    entry[1](m)

    def _on_monitor(self, shard: int) -> None:
        mon = self._monitors[shard]
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handler.on_shard_connected(shard)

    def _sweep(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, (deadline, _) in self.pending.items() if deadline <= now]
        for rid in expired:
            _, cb = self.pending.pop(rid)
            cb(wire.Result(rid=rid, code="unavailable", error="mailbox shard did not answer in time"))
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for box in self.out:
            if box is not None:
                box.flush()
        for s in self.socks + self._monitors:
            try:
                self.loop.remove_reader(s.getsockopt(zmq.FD))
            except Exception:
                pass
            s.close(linger=200)
