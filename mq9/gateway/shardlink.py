"""The gateway's side of the gateway <-> shard link: one DEALER per shard it talks to.

Shards are named by ``ShardId`` (node_id, shard index): this node's over ipc, other nodes'
over TCP, sockets opened on first use. Requests carry a gateway-unique ``rid``; the answer
(``Result``) finds its callback here. A request unanswered within ``timeout`` is answered
locally with ``unavailable``, so a client never waits forever on a dead or stopped shard.
The first frame on a new socket is a Hello (the shard drops what an earlier process of this
gateway subscribed); when the connection to a shard is made again (the shard restarted),
ZeroMQ's monitor tells us and the gateway re-registers its owner subscriptions there.
"""

from __future__ import annotations

import asyncio
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from mq9 import api, curve, log, metrics, wire
from mq9.cluster.slots import ShardId
from mq9.gateway.topology import Topology
from mq9.gateway.zsock import Outbox, watch

MOVED_RETRY = 0.05  # seconds between asks while a slot moves
MOVE_PATIENCE = 10.0  # how long a request may chase a moving slot
_MOVED = api.Code.MOVED


class _Shard:
    __slots__ = ("sock", "monitor", "out", "endpoint", "connected")


class ShardLink:
    def __init__(self, topology: Topology, identity: bytes, ctx: zmq.Context,
                 loop: asyncio.AbstractEventLoop, timeout: float = 3.0):
        self.topology = topology
        self.identity = identity
        self.ctx = ctx
        self.loop = loop
        self.timeout = timeout
        self.handler = None  # the gateway's Mailboxes: on_deliver_run, on_shard_connected
        self.pending: dict[int, list] = {}  # rid -> [deadline, callback, op, give_up_at, arg]
        self._rid = 0
        self.shards: dict[ShardId, _Shard] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, handler) -> None:
        self.handler = handler
        # Connect to this node's shards at once, so subscriptions made before the first
        # request are registered when each shard comes up.
        for i in range(self.topology.cfg.shards):
            self._shard((self.topology.node, i))
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def _shard(self, target: ShardId) -> _Shard | None:
        sh = self.shards.get(target)
        if sh is not None:
            return sh
        endpoint = self.topology.shard_endpoint(target)
        if endpoint is None:
            return None
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, self.identity)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sh = _Shard()
        sh.sock, sh.endpoint = s, endpoint
        sh.monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        curve.connect(s, endpoint, self.topology.cfg.cluster_secret)
        drain = watch(self.loop, s, self._on_frame)
        sh.out = Outbox(s, self.loop, after_send=drain)
        # First on this socket, ahead of every Subscribe: the shard forgets what an earlier
        # process of this gateway (same identity) subscribed.
        sh.out.put(wire.Hello())
        sh.connected = False
        self.loop.add_reader(sh.monitor.getsockopt(zmq.FD), self._on_monitor, target)
        # ZeroMQ's FD only signals a pipe that went from empty to readable after a read found
        # it empty: until someone reads the monitor once, no event ever wakes the loop (and
        # subscriptions were never re-registered on a restarted shard). Read it once now.
        self.loop.call_soon(self._on_monitor, target)
        self.shards[target] = sh
        return sh

    def shard_of(self, mail_id: str) -> ShardId:
        return self.topology.owner(mail_id)

    def post(self, target: ShardId, op) -> None:
        sh = self._shard(target)
        if sh is not None:
            sh.out.put(op)

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def request(self, target: ShardId, op, callback, arg=None) -> None:
        """``op.rid`` must come from ``next_rid``; ``callback(answer, arg)`` is called once
        (a bound method and an argument cost less per request than a fresh closure)."""
        sh = self._shard(target)
        if sh is None:
            callback(wire.Result(rid=op.rid, code=api.Code.UNAVAILABLE,
                                 error=api.NO_ROUTE.format(target[0])), arg)
            return
        now = time.monotonic()
        self.pending[op.rid] = [now + self.timeout, callback, op, now + MOVE_PATIENCE, arg]
        if op.__class__ is wire.SendRun:
            sh.out.put_now(op)
        else:
            sh.out.put(op)

    def _on_frame(self, frame: bytes) -> None:
        try:
            msgs = wire.decode_from_shard(frame)
        except Exception:
            metrics.DROPS.labels("bad_frame").inc()
            return
        for m in msgs:
            if m.__class__ is wire.DeliverRun:
                self.handler.on_deliver_run(m)
            elif m.code is not None and m.code == _MOVED and m.rid in self.pending:
                # The mailbox's slot is moving: ask the new owner once the slot map says who.
                entry = self.pending[m.rid]
                if time.monotonic() < entry[3]:
                    entry[0] = time.monotonic() + self.timeout
                    self.loop.call_later(MOVED_RETRY, self._resend, m.rid)
                else:
                    self.pending.pop(m.rid)
                    entry[1](wire.Result(rid=m.rid, code=api.Code.UNAVAILABLE,
                                         error=api.STILL_MOVING), entry[4])
            else:
                entry = self.pending.pop(m.rid, None)
                if entry is not None:
                    entry[1](m, entry[4])

    def _resend(self, rid: int) -> None:
        entry = self.pending.get(rid)
        if entry is None:
            return
        op = entry[2]  # the gateway's topology watcher brings the new slot map
        sh = self._shard(self.topology.owner(op.mail_id))
        if sh is None:
            self.pending.pop(rid)
            entry[1](wire.Result(rid=rid, code=api.Code.UNAVAILABLE, error=api.NO_ROUTE_TO_NEW_OWNER),
                     entry[4])
            return
        sh.out.put(op)

    def _on_monitor(self, target: ShardId) -> None:
        sh = self.shards.get(target)
        if sh is None:
            return
        mon = sh.monitor
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            if not sh.connected:
                # The first connection carries everything queued since the socket opened,
                # Hello and Subscribes in order: re-sending them could only cause duplicates.
                sh.connected = True
                continue
            log.info("shard_connected", shard=target)
            self.handler.on_shard_connected(target)

    def _sweep(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, entry in self.pending.items() if entry[0] <= now]
        for rid in expired:
            entry = self.pending.pop(rid)
            entry[1](wire.Result(rid=rid, code=api.Code.UNAVAILABLE, error=api.SHARD_TIMEOUT),
                     entry[4])
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sh in self.shards.values():
            sh.out.flush()
            for s in (sh.sock, sh.monitor):
                try:
                    self.loop.remove_reader(s.getsockopt(zmq.FD))
                except Exception:
                    pass
                s.close(linger=200)
