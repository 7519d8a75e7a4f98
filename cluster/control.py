"""Client side of the metadata group's control channel (the member's side is
``control_server.py``).

There is no separate admin port: pysyncobj's Raft port already answers "utility"
messages (a connection whose first message is a list, the way its ``syncobj_admin`` tool
sends ``['status']`` or ``['add', 'host:port']``). ``raft.RaftNode`` registers one more
utility command, ``'mq9'``, and requests travel as ``['mq9', op, args]``; the reply is a
dict with ``ok`` and, on failure, ``code`` and ``error``. Messages are pickled by
pysyncobj, and encrypted and authenticated with the cluster secret (Fernet: AES-CBC plus
HMAC-SHA256, checked before anything is unpickled; a fresh random key per connection
against replays). A member with a secret drops a connection whose first frame does not
authenticate, so a caller without the secret only sees the connection close: ``call``
reports that as ``code`` "unauthenticated". Only in-process tests on loopback run without
a secret (``MetadataGroup`` refuses anything else, ``mq9 node`` and ``mq9 cluster`` always
have one).

So every member's ``--cluster-port`` serves Raft, ``syncobj_admin -status``, ``mq9 node
--join`` and ``mq9 cluster status/remove``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Collection
from typing import Any

from mq9.cluster.raft import Args, UtilityError, utility_call

UNAUTHENTICATED_TRIES = 4  # dropped connections in a row before call_retry gives up

# A member's answer as it came off the wire: a dict with ``ok``; the other keys and their
# shapes are the operation's (``MetadataGroup.status``, a transition's result...).
Answer = dict[str, Any]


class ControlError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return address


def call(address: str, op: str, args: Args | None = None, *, password: str | None = None,
         timeout: float = 5.0) -> Answer:
    """One request to one member. Raises ControlError; ``code`` "unreachable" means the
    request may not have arrived, "unauthenticated" that the member dropped it unread
    (another secret, or none), anything else is the member's answer."""
    check_address(address)
    started = time.monotonic()
    try:
        res = utility_call(address, [op, args or {}], password=password, timeout=timeout)
    except ImportError as e:  # a password needs the cryptography package
        raise ControlError("unavailable", str(e)) from None
    except UtilityError as e:
        if (str(e) == "connection lost" and time.monotonic() - started < timeout * 0.8
                and _listens(address)):
            # pysyncobj says "connection lost" for a refused connect, a timeout and a
            # member that dropped us; a quick drop by a port that accepts connections is
            # what a member does to a frame sealed with another secret, or with none.
            raise ControlError("unauthenticated", f"{address} closed the connection without "
                               f"answering: wrong or missing cluster secret?") from None
        raise ControlError("unreachable", f"{address}: {e}") from None
    if res is None:  # the connect itself failed at once
        raise ControlError("unreachable", f"{address}: cannot connect")
    if isinstance(res, str):  # an exception text, or an unknown command on an old member
        raise ControlError("failed", f"{address}: {res}")
    if not isinstance(res, dict):
        raise ControlError("failed", f"{address}: unexpected reply {res!r}")
    if not res.get("ok", False):
        raise ControlError(res.get("code") or "failed", res.get("error") or "failed")
    return res


def _listens(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


def call_retry(address: str, op: str, args: Args | None = None, *, password: str | None = None,
               timeout: float = 30.0, per_try: float = 5.0,
               retry_codes: Collection[str] = ("unreachable", "no_leader", "retry", "denied", "busy"),
               ) -> Answer:
    """``call`` again until it succeeds, fails for a reason retrying cannot fix, or
    ``timeout`` passes. Only for requests that are safe to repeat."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    dropped = 0
    while True:
        try:
            return call(address, op, args, password=password,
                        timeout=max(0.5, min(per_try, deadline - time.monotonic())))
        except ControlError as e:
            # A member that is going down also drops connections; one that drops every
            # try is refusing our secret, which retrying cannot fix.
            dropped = dropped + 1 if e.code == "unauthenticated" else 0
            if (e.code not in retry_codes and not 0 < dropped < UNAUTHENTICATED_TRIES) \
                    or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
