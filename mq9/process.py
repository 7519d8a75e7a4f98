"""Helpers for the child processes of a node (gateways, shards).

Linux only where it matters (prctl); elsewhere these are no-ops, and a killed supervisor may
leave children behind.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_COMM_MAX = 15  # the kernel keeps 16 bytes of a process name, NUL included

_libc = None


def _prctl(option: int, arg: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
        _libc.prctl.restype = ctypes.c_int
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _expected_parent() -> int | None:
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else None


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` (SIGKILL) to this process when its parent dies
    (``kill -9`` included).

    ``parent_pid`` defaults to the multiprocessing parent. The parent may already have died
    between our start and the prctl call; the signal would then never come, so in that case
    we exit at once. The kernel ties the signal to the parent *thread* that created us: the
    supervisor spawns from its main thread only.
    """
    if not sys.platform.startswith("linux"):
        return
    _prctl(_PR_SET_PDEATHSIG, sig)
    expected = parent_pid if parent_pid is not None else _expected_parent()
    ppid = os.getppid()
    if (expected is not None and ppid != expected) or (expected is None and ppid == 1):
        os._exit(1)


def set_name(name: str) -> None:
    """Name this process for ps/top/``/proc/PID/comm`` (first 15 bytes), e.g. ``mq9-gateway-1``.

    Spawned children otherwise all show as ``python``; tests and operators find a gateway
    or shard by this name.
    """
    if not sys.platform.startswith("linux"):
        return
    buf = ctypes.create_string_buffer(name.encode()[:_COMM_MAX])
    _prctl(_PR_SET_NAME, ctypes.addressof(buf))


def ignore_terminal_interrupt() -> None:
    """Ignore SIGINT (Ctrl-C reaches the whole foreground process group).

    The supervisor turns Ctrl-C into an ordered stop (gateways first, then shards, by
    SIGTERM); a child hit by the same SIGINT would instead die mid-work with a
    KeyboardInterrupt traceback. A run function may still install its own SIGINT handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def comm(pid: int) -> str | None:
    """The process name of ``pid`` as ``set_name`` left it, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


# Young-generation collections every 700 allocations, and full ones as the heap grows, walk
# a shard's million mailboxes again and again: profiled at a third of a shard's time while
# creating mailboxes. Collections stay on (asyncio and closures do make cycles), less often.
GC_THRESHOLDS = (50_000, 20, 100)


def settle_heap() -> None:
    """Call once startup has built the long-lived state: collect, move what survives out of
    the collector's sight (``gc.freeze``) and space collections out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
