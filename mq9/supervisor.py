"""The children of one node: spawned, restarted after a back-off when they die, signalled,
stopped in order. What the node does with them (when it is ready, its phases, its signals)
is ``mq9/node.py``'s.

Children are spawned (not forked: no inherited event loops, sockets or locks) from the main
thread, which matters for ``PR_SET_PDEATHSIG``: the kernel sends it when the thread that
created the child exits. A child that dies is restarted after a back-off that grows while it
keeps dying young. ``stop`` sends SIGTERM to the gateways first (they stop accepting and
flush), then to the shards (they finish their batch and close RocksDB), each group within a
bounded time, then SIGKILL; ``hurry`` skips the waiting.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess

from mq9 import log, process
from mq9 import reload as reloading
from mq9.config import Config

# 10 + 10 s stays inside Kubernetes' default 30 s termination grace period.
GATEWAY_STOP_TIMEOUT = 10.0
SHARD_STOP_TIMEOUT = 10.0
RESTART_DELAY_FIRST = 0.2
RESTART_DELAY_MAX = 10.0
STABLE_AFTER = 30.0  # a child that ran this long restarts with the first delay again


class Kind(StrEnum):
    """A child's kind: its name's prefix and its label in ``mq9_process_restarts``."""

    SHARD = "shard"
    GATEWAY = "gateway"


ChildMain = Callable[[Config, int], None]  # a child's run function: (config, its index)


def _resolve(target: str) -> ChildMain:
    module, _, func = target.partition(":")
    run: ChildMain = getattr(importlib.import_module(module), func)
    return run


def _child_main(kind: Kind, cfg: Config, index: int, target: str | None = None) -> None:
    """Entry point of every spawned child. ``target`` ("module:function") replaces the real
    run function in the supervisor's own tests only."""
    process.die_with_parent()
    process.set_name(f"mq9-{kind}-{index}")
    process.ignore_terminal_interrupt()
    log.setup(cfg.log_level, f"{kind}-{index}", fmt=cfg.log_format)
    run: ChildMain
    try:
        if target is not None:
            run = _resolve(target)
        elif kind == Kind.GATEWAY:
            from mq9.gateway.server import run
        elif kind == Kind.SHARD:
            from mq9.shard.server import run
        else:
            raise ValueError(f"unknown child kind {kind!r}")
        run(cfg, index)
    except Exception:
        # one logfmt line instead of multiprocessing's multi-line traceback on stderr
        log.exception("child_crashed")
        sys.exit(1)


def exit_fields(code: int | None) -> dict[str, str | int]:
    """How a child ended, as log fields."""
    if code is None:
        return {}
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


class Child:
    __slots__ = ("kind", "index", "name", "proc", "pid", "started", "failures", "restart_at",
                 "retired")

    def __init__(self, kind: Kind, index: int):
        self.kind = kind
        self.index = index
        self.name = f"{kind}-{index}"
        self.proc: BaseProcess | None = None  # main thread only
        self.pid: int | None = None  # what other threads may look at
        self.started = 0.0
        self.failures = 0  # deaths in a row without a stable run, sets the backoff
        self.restart_at: float | None = None
        self.retired: str | None = None  # why it is not restarted when it exits


class Supervisor:
    """Owns the child processes. Runs in the main thread only, except for ``Child.pid``,
    which other threads may read.

    ``wake`` is a socket the owner makes readable to cut a wait short (its signal wakeup
    fd); ``on_wake`` runs after every wait. ``on_death(child, pid)`` runs for a child found
    dead while running, ``before_restart(child)`` before it is spawned again.
    """

    def __init__(self, cfg: Config, targets: dict[str, str] | None, *, wake: socket.socket,
                 on_wake: Callable[[], None], on_death: Callable[[Child, int], None],
                 before_restart: Callable[[Child], None]) -> None:
        self.cfg = cfg  # what children are spawned with; the node replaces it as it learns more
        self.targets = targets or {}
        self.ctx = multiprocessing.get_context("spawn")
        self.shards = [Child(Kind.SHARD, i) for i in range(cfg.shards)]
        self.gateways = [Child(Kind.GATEWAY, i) for i in range(cfg.gateway_count)]
        self.children = self.shards + self.gateways
        self.wake = wake
        self.on_wake = on_wake
        self.on_death = on_death
        self.before_restart = before_restart
        self.hurry = False  # stop kills at once

    def spawn(self, c: Child) -> None:
        p = self.ctx.Process(target=_child_main, name=f"mq9-{c.name}",
                             args=(c.kind, self.cfg, c.index, self.targets.get(c.kind)))
        try:
            with reloading.signals_blocked():
                p.start()
        except OSError as e:
            log.error("child_spawn_failed", child=c.name, error=str(e))
            self._schedule_restart(c, 0.0)
            return
        c.proc = p
        c.pid = p.pid
        c.started = time.monotonic()
        log.info("child_started", child=c.name, pid=p.pid)

    def wait(self, timeout: float, children: list[Child] | None = None) -> None:
        """Until ``wake``, the death of one of ``children`` (default all), or the timeout."""
        waitables: list[int | socket.socket] = [
            c.proc.sentinel for c in (children or self.children) if c.proc is not None]
        waitables.append(self.wake)
        wait_any(waitables, max(0.0, timeout))
        self.on_wake()

    def signal(self, sig: int, children: list[Child] | None = None) -> int:
        """Sends ``sig`` to the running ones among ``children`` (default all); returns how
        many got it."""
        told = 0
        for c in self.children if children is None else children:
            if c.pid is not None:
                try:
                    os.kill(c.pid, sig)
                    told += 1
                except ProcessLookupError:  # died just now: it restarts with self.cfg
                    pass
        return told

    def retire(self, children: list[Child], sig: int, reason: str) -> None:
        """Sends ``sig`` to ``children`` and lets them end for good: when they exit they are
        not restarted."""
        for c in children:
            c.restart_at = None
            c.retired = reason
        self.signal(sig, children)

    def _schedule_restart(self, c: Child, uptime: float) -> float:
        if uptime >= STABLE_AFTER:
            c.failures = 0
        delay = min(RESTART_DELAY_FIRST * 2.0 ** c.failures, RESTART_DELAY_MAX)
        c.failures += 1
        c.restart_at = time.monotonic() + delay
        return delay

    def reap(self) -> None:
        """Takes note of children that exited and schedules their restart."""
        for c in self.children:
            p = c.proc
            if p is None:
                continue
            pid, code = p.pid, p.exitcode
            if pid is None or code is None:  # not started, or running
                continue
            uptime = time.monotonic() - c.started
            p.close()
            c.proc = None
            c.pid = None
            self.on_death(c, pid)
            if c.retired is not None:
                log.info("child_stopped", child=c.name, pid=pid, **exit_fields(code),
                         reason=c.retired)
                continue
            delay = self._schedule_restart(c, uptime)
            log.error("child_died", child=c.name, pid=pid, **exit_fields(code),
                      uptime=round(uptime, 3), restart_in=round(delay, 3))

    def restart_due(self) -> float | None:
        """Restarts children whose delay has passed; returns the next restart time."""
        now = time.monotonic()
        nxt: float | None = None
        for c in self.children:
            if c.restart_at is None:
                continue
            if c.restart_at <= now:
                c.restart_at = None
                self.before_restart(c)
                log.info("child_restarting", child=c.name, attempt=c.failures)
                self.spawn(c)
            if c.restart_at is not None:
                nxt = c.restart_at if nxt is None else min(nxt, c.restart_at)
        return nxt

    def stop(self) -> None:
        """Gateways first, then shards; nothing is restarted any more."""
        for c in self.children:
            c.restart_at = None
        self._stop_group(self.gateways, GATEWAY_STOP_TIMEOUT)
        self._stop_group(self.shards, SHARD_STOP_TIMEOUT)

    def _stop_group(self, group: list[Child], timeout: float) -> None:
        running = [(c, c.proc) for c in group if c.proc is not None]
        if not running:
            return
        for _, p in running:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        while True:
            for c, p in running:
                if c.proc is not None and p.exitcode is not None:
                    log.info("child_stopped", child=c.name, pid=c.pid, **exit_fields(p.exitcode))
                    self._release(c, p)
            left = [(c, p) for c, p in running if c.proc is not None]
            if not left:
                return
            if self.hurry or time.monotonic() >= deadline:
                for c, p in left:
                    log.warning("child_killed", child=c.name, pid=c.pid,
                                reason="second signal" if self.hurry else "stop timeout")
                    p.kill()
                    p.join(5)
                    self._release(c, p)
                return
            self.wait(min(0.5, deadline - time.monotonic()), [c for c, _ in left])

    def _release(self, c: Child, p: BaseProcess) -> None:
        try:
            p.close()
        except ValueError:  # still running after SIGKILL + 5 s: leave it to the kernel
            pass
        c.proc = None
        c.pid = None

    def close(self) -> None:
        """Last resort on any exit path: no child outlives the supervisor."""
        for c in self.children:
            p = c.proc
            if p is not None:
                if p.exitcode is None:
                    p.kill()
                    p.join(5)
                self._release(c, p)
