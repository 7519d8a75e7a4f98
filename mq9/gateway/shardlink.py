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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from mq9 import api, curve, log, metrics, wire
from mq9.cluster.slots import ShardId
from mq9.gateway.topology import Topology
from mq9.gateway.zsock import Outbox, Socket, int_option, watch

MOVED_RETRY = 0.05  # seconds between asks while a slot moves
MOVE_PATIENCE = 10.0  # how long a request may chase a moving slot
_MOVED = api.Code.MOVED

# What a request may be, and what answers it (by rid): a Result, or for stored sends a
# Sent or SentRun. The shard's decoder also knows MailboxList, which answers the supervisor.
Request = wire.Create | wire.Send | wire.SendRun | wire.Query | wire.Delete
Answer = wire.Result | wire.Sent | wire.SentRun | wire.MailboxList
A = TypeVar("A")  # what a request's callback is given back with its answer


class ShardHandler(Protocol):
    """What the link hands over beside answers (the gateway's ``Mailboxes``)."""

    def on_deliver_run(self, d: wire.DeliverRun) -> None: ...
    def on_shard_connected(self, shard: ShardId) -> None: ...


class _Shard:
    __slots__ = ("sock", "monitor", "out", "endpoint", "connected")

    def __init__(self, sock: Socket, monitor: Socket, out: Outbox[wire.ToShard], endpoint: str):
        self.sock = sock
        self.monitor = monitor
        self.out = out
        self.endpoint = endpoint
        self.connected = False


class _Pending(msgspec.Struct, Generic[A]):
    """A request waiting for its answer (a Struct: one is made per request, as cheaply as a list)."""

    deadline: float  # answered ``unavailable`` after this
    callback: Callable[[Answer, A], None]
    op: Request
    give_up_at: float  # a moving slot is chased until then
    arg: A


class ShardLink:
    handler: ShardHandler  # set by start

    def __init__(self, topology: Topology, identity: bytes, ctx: zmq.Context[Socket],
                 loop: asyncio.AbstractEventLoop, timeout: float = 3.0):
        self.topology = topology
        self.identity = identity
        self.ctx = ctx
        self.loop = loop
        self.timeout = timeout
        # rid -> its request; callbacks take args of their own type each
        self.pending: dict[int, _Pending[Any]] = {}
        self._rid = 0
        self.shards: dict[ShardId, _Shard] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, handler: ShardHandler) -> None:
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
        monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        curve.connect(s, endpoint, self.topology.cfg.cluster_secret)
        drain = watch(self.loop, s, self._on_frame)
        sh = _Shard(s, monitor, Outbox(s, self.loop, after_send=drain), endpoint)
        # First on this socket, ahead of every Subscribe: the shard forgets what an earlier
        # process of this gateway (same identity) subscribed.
        sh.out.put(wire.Hello())
        self.loop.add_reader(monitor.fileno(), self._on_monitor, target)
        # ZeroMQ's FD only signals a pipe that went from empty to readable after a read found
        # it empty: until someone reads the monitor once, no event ever wakes the loop (and
        # subscriptions were never re-registered on a restarted shard). Read it once now.
        self.loop.call_soon(self._on_monitor, target)
        self.shards[target] = sh
        return sh

    def shard_of(self, mail_id: str) -> ShardId:
        return self.topology.owner(mail_id)

    def post(self, target: ShardId, op: wire.ToShard) -> None:
        sh = self._shard(target)
        if sh is not None:
            sh.out.put(op)

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def request(self, target: ShardId, op: Request, callback: Callable[[Answer, A], None], arg: A) -> None:
        """``op.rid`` must come from ``next_rid``; ``callback(answer, arg)`` is called once
        (a bound method and an argument cost less per request than a fresh closure)."""
        sh = self._shard(target)
        if sh is None:
            callback(wire.Result(rid=op.rid, code=api.Code.UNAVAILABLE,
                                 error=api.NO_ROUTE.format(target[0])), arg)
            return
        now = time.monotonic()
        self.pending[op.rid] = _Pending(now + self.timeout, callback, op, now + MOVE_PATIENCE, arg)
        if op.__class__ is wire.SendRun:
            sh.out.put_now(op)
        else:
            sh.out.put(op)

    def _on_frame(self, frame: bytes) -> None:
        try:
            msgs: list[wire.FromShard] = wire.decode_from_shard(frame)
        except Exception:
            metrics.DROPS.labels("bad_frame").inc()
            return
        for m in msgs:
            if type(m) is wire.DeliverRun:
                self.handler.on_deliver_run(m)
                continue
            if TYPE_CHECKING:
                # What mypy cannot tell from ``type(m) is not`` (a subclass would pass), at no
                # cost here: isinstance would be a call per message.
                assert not isinstance(m, wire.DeliverRun)
            if m.code is not None and m.code == _MOVED and m.rid in self.pending:
                # The mailbox's slot is moving: ask the new owner once the slot map says who.
                moving = self.pending[m.rid]
                if time.monotonic() < moving.give_up_at:
                    moving.deadline = time.monotonic() + self.timeout
                    self.loop.call_later(MOVED_RETRY, self._resend, m.rid)
                else:
                    self.pending.pop(m.rid)
                    moving.callback(wire.Result(rid=m.rid, code=api.Code.UNAVAILABLE,
                                                error=api.STILL_MOVING), moving.arg)
            else:
                entry: _Pending[Any] | None = self.pending.pop(m.rid, None)
                if entry is not None:
                    entry.callback(m, entry.arg)

    def _resend(self, rid: int) -> None:
        entry = self.pending.get(rid)
        if entry is None:
            return
        op = entry.op  # the gateway's topology watcher brings the new slot map
        sh = self._shard(self.topology.owner(op.mail_id))
        if sh is None:
            self.pending.pop(rid)
            entry.callback(wire.Result(rid=rid, code=api.Code.UNAVAILABLE, error=api.NO_ROUTE_TO_NEW_OWNER),
                           entry.arg)
            return
        sh.out.put(op)

    def _on_monitor(self, target: ShardId) -> None:
        sh = self.shards.get(target)
        if sh is None:
            return
        mon = sh.monitor
        events = int_option(mon)
        while events(zmq.EVENTS) & zmq.POLLIN:
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
        expired = [rid for rid, entry in self.pending.items() if entry.deadline <= now]
        for rid in expired:
            entry = self.pending.pop(rid)
            entry.callback(wire.Result(rid=rid, code=api.Code.UNAVAILABLE, error=api.SHARD_TIMEOUT),
                           entry.arg)
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sh in self.shards.values():
            sh.out.flush()
            for s in (sh.sock, sh.monitor):
                try:
                    self.loop.remove_reader(s.fileno())
                except Exception:
                    pass
                s.close(linger=200)
