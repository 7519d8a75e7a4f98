"""``mq9 node --signal NAME[=PID]``: send a running node's supervisor a signal by name, as
``nats-server --signal`` does, with nats-server's names and mapping:

    stop -> SIGKILL   quit -> SIGINT   term -> SIGTERM
    reopen -> SIGUSR1   reload -> SIGHUP   ldm -> SIGUSR2 (lame duck mode)

``=PID`` is a process id or a pid file. Without it the pid comes from the node's
``data_dir/supervisor.lock``, the data dir being found as ``mq9 node`` finds it (--data-dir,
MQ9_DATA_DIR, data_dir in the --config file, the default). The supervisor holds a lock on
that file while it runs, so a pid left there by a node that is gone is never signalled.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tomllib
from collections.abc import Mapping

from mq9.config import Config

SIGNALS = {"stop": signal.SIGKILL, "quit": signal.SIGINT, "term": signal.SIGTERM,
           "reopen": signal.SIGUSR1, "reload": signal.SIGHUP, "ldm": signal.SIGUSR2}
HELP = ("send a running node a signal and exit: " + ", ".join(
    f"{n} ({s.name})" for n, s in SIGNALS.items()) + "; =PID (or =PIDFILE) picks the process, "
    "else the supervisor of --data-dir's node")


class SignalError(Exception):
    """A one-line reason the signal was not sent."""


def parse(text: str) -> tuple[signal.Signals, str | None]:
    name, sep, target = text.partition("=")
    sig = SIGNALS.get(name.strip().lower())
    if sig is None:
        raise SignalError(f"unknown signal {name!r}: one of {', '.join(SIGNALS)}")
    if sep and not target.strip():
        raise SignalError(f"--signal {name}=: no pid after '='")
    return sig, (target.strip() if sep else None)


def data_dir(flag: str | None, config_flag: str | None, environ: Mapping[str, str] = os.environ) -> str:
    if flag:
        return flag
    if environ.get("MQ9_DATA_DIR"):
        return environ["MQ9_DATA_DIR"]
    path = config_flag or environ.get("MQ9_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise SignalError(f"{path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SignalError(f"{path}: {e}") from None
        value = doc.get("data_dir", doc.get("data-dir"))
        if value:
            return str(value)
    return Config.data_dir


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise SignalError(f"pid file {path}: {e.strerror}") from None
    if not text.isdigit():
        raise SignalError(f"pid file {path} holds no pid")
    return int(text)


def node_pid(data_dir: str) -> int:
    """The pid of the supervisor running on ``data_dir``, or SignalError."""
    path = os.path.join(data_dir, "supervisor.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SignalError(f"no mq9 node runs on data dir {data_dir} (no {path})") from None
    except OSError as e:
        raise SignalError(f"{path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path)  # locked: its supervisor is alive
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise SignalError(f"no mq9 node runs on data dir {data_dir} (nothing holds {path})")
    finally:
        os.close(fd)


def send(text: str, data_dir_: str) -> tuple[signal.Signals, int]:
    sig, target = parse(text)
    if target is None:
        pid = node_pid(data_dir_)
    elif target.isdigit():
        pid = int(target)
    else:
        pid = _read_pid(target)
    if pid <= 1:
        raise SignalError(f"refusing to signal pid {pid}")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise SignalError(f"no process {pid}") from None
    except PermissionError:
        raise SignalError(f"not allowed to signal process {pid}") from None
    return sig, pid
