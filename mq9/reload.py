"""Config reload without restart (SIGHUP, ``mq9 node --signal reload``).

The supervisor keeps the flags and environment it started from. On SIGHUP it reads them and
the ``--config`` file again, through ``config.from_args`` (which loads the auth file and
builds the TLS context, as at start), and only if all of it is good:

1. takes the reloadable settings into its own config, so a child restarted later starts
   with them;
2. writes them, all of them, to ``run_dir/reload.msgpack`` (``wire.Reloaded``);
3. sends SIGHUP to every child, which reads that file in its own loop and re-reads the
   files it names: gateways swap users, TLS context and INFO for new connections and,
   when authorization changed, check existing connections again (``gateway/reauth.py``);
   every process sets its log level.

Settings that only a restart changes are named in one log line and otherwise ignored.

SIGHUP (and SIGUSR2, lame duck) would kill a child that has not installed its handler yet
(a Python child is busy importing for a while after it is spawned), so the supervisor spawns
children with both blocked; a child unblocks the ones it handles (``accept``) once its
handlers are in place and then receives any signal sent meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from mq9.config import Config
from mq9.wire import Reloaded

FILE = "reload.msgpack"
# what a reload changes; the rest of Config needs a restart (``config`` names the file read)
RELOADABLE = tuple(f for f in Reloaded.__struct_fields__ if f != "generation")
_SAME_FILE = ("config",)


def load(source: argparse.Namespace | None, environ: Mapping[str, str], running: Config) -> Config:
    """The configuration as flags (``source``), ``environ`` and the config file give it now,
    checked as at start; ValueError says in one line what is wrong. Without ``source`` (a
    node started from code, not ``mq9 node``) the files named in ``running`` are re-read."""
    from mq9 import config

    try:
        if source is None:
            new = dataclasses.replace(running)
            config._check_security(new)
            return new
        return config.from_args(source, environ)
    except OSError as e:  # the --config file
        raise ValueError(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None


def needs_restart(running: Config, new: Config) -> list[str]:
    """The settings ``new`` changes that a reload cannot apply."""
    return [f.name for f in dataclasses.fields(Config)
            if f.name not in RELOADABLE and f.name not in _SAME_FILE
            and getattr(new, f.name) != getattr(running, f.name)]


def changed(running: Config, new: Config) -> list[str]:
    return [n for n in RELOADABLE if getattr(new, n) != getattr(running, n)]


def settings(cfg: Config | Reloaded) -> dict[str, Any]:
    """The reloadable settings by name, each of its own field's type."""
    return {n: getattr(cfg, n) for n in RELOADABLE}


def apply(cfg: Config, doc: Reloaded) -> Config:
    return dataclasses.replace(cfg, **settings(doc))


def write(run_dir: str, doc: Reloaded) -> None:
    path = os.path.join(run_dir, FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.msgpack.encode(doc))
    os.replace(tmp, path)  # a child reading now sees the old file or the new, never half


def read(run_dir: str) -> Reloaded | None:
    """The last reload, or None if there was none since the node started."""
    try:
        with open(os.path.join(run_dir, FILE), "rb") as f:
            return msgspec.msgpack.decode(f.read(), type=Reloaded)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Around spawning a child: it inherits SIGHUP and SIGUSR2 blocked (see the module doc)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR2})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def accept(*signals: signal.Signals) -> None:
    """In a child, once its handlers of ``signals`` are installed: deliver them from now on
    (a signal it does not handle stays blocked rather than killing it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))
