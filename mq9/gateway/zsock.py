"""ZeroMQ sockets driven by the gateway's asyncio loop, with one frame per loop turn.

``Outbox`` gathers wire structs for one destination and sends them as a single msgpack frame
at the end of the current loop turn. ``watch`` reads a socket from the loop: ZeroMQ's FD is
edge-triggered and also consumed by sends, so readable sockets are drained until EVENTS says
empty, and re-checked after every send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar, cast

import msgspec
import zmq

from mq9 import metrics, wire

M = TypeVar("M", bound=msgspec.Struct)  # the wire structs one destination takes
Socket = zmq.Socket[bytes]


class Outbox(Generic[M]):
    __slots__ = ("sock", "loop", "items", "_after_send", "prefix")

    def __init__(self, sock: Socket, loop: asyncio.AbstractEventLoop,
                 after_send: Callable[[], None] | None = None, prefix: list[bytes] | None = None):
        self.sock = sock
        self.loop = loop
        self.items: list[M] = []
        self._after_send = after_send
        self.prefix = prefix  # leading frames (a ROUTER identity), if any

    def put(self, msg: M) -> None:
        if not self.items:
            self.loop.call_soon(self.flush)
        self.items.append(msg)

    def put_now(self, msg: M) -> None:
        """Queue ``msg`` and send what is queued at once, without waiting for the end of
        the loop turn: for a big piece of work, so that the receiver starts on it while
        this process goes on parsing (the two processes overlap instead of taking turns)."""
        self.items.append(msg)
        self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items = self.items
        self.items = []
        try:
            frame = wire.encode(items)
        except (UnicodeEncodeError, OverflowError):
            # A subject that is not UTF-8 (nats-server accepts raw bytes) cannot cross to
            # another process; drop just those, not the whole frame.
            good: list[M] = []
            for m in items:
                try:
                    wire.encode([m])
                    good.append(m)
                except (UnicodeEncodeError, OverflowError):
                    metrics.DROPS.labels("unencodable").inc()
            frame = wire.encode(good)
        try:
            if self.prefix:
                self.sock.send_multipart([*self.prefix, frame], zmq.NOBLOCK)
            else:
                self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            # The peer is gone or hopelessly behind (HWM reached): dropping beats blocking
            # the loop. Requests among these time out at the sender as ``unavailable``.
            metrics.DROPS.labels("ipc_backlog").inc(len(items))
        if self._after_send is not None:
            self._after_send()


def watch(loop: asyncio.AbstractEventLoop, sock: Socket, on_frame: Callable[[bytes], None],
          max_batch: int = 1000) -> Callable[[], None]:
    """Call ``on_frame(frame_bytes)`` for every message readable on ``sock``; returns a
    ``drain`` function to call after sends on the same socket."""
    getsockopt = int_option(sock)

    def drain() -> None:
        n = 0
        while getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            on_frame(frame)
            n += 1
            if n >= max_batch:
                # Let clients run too; come back on the next turn.
                loop.call_soon(drain)
                return

    loop.add_reader(sock.fileno(), drain)
    # The FD signals only after a read found the socket empty: read once to arm it.
    loop.call_soon(drain)
    return drain


def int_option(sock: Socket) -> Callable[[int], int]:
    """``sock.getsockopt`` for options whose value is an int (EVENTS): pyzmq declares every
    option as ``int | bytes``. Bound once, outside the per-frame loop."""
    return cast("Callable[[int], int]", sock.getsockopt)
