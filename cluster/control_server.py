"""The member's side of the control channel (the wire and the client are ``control.py``):
one handler per operation, found in a table by the operation's name.

Handlers run on pysyncobj's tick thread, so none of them blocks: each answers at once with
``reply(result, None)`` or hands ``reply`` to a Raft callback. A result is a dict with
``ok`` and, on failure, ``code`` and ``error``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from mq9.cluster.control import check_address
from mq9.cluster.raft import Args, RaftNode, Reply, Result
from mq9.cluster.state import ClusterState


class Member(Protocol):
    """What the handlers ask of the member that answers (``metadata.MetadataGroup``)."""

    @property
    def raft(self) -> RaftNode: ...

    def status(self) -> Result: ...

    def snapshot(self) -> ClusterState: ...

    def raft_members(self) -> Collection[str]: ...

    def change_raft_membership(self, address: str, adding: bool) -> None: ...


Handler = Callable[["ControlServer", Args, Reply], None]


class ControlServer:
    def __init__(self, group: Member):
        self.group = group  # the member that answers

    def handle(self, message: list[object], reply: Reply) -> None:
        try:
            op, args = message[0], (message[1] if len(message) > 1 else {}) or {}
            if not isinstance(args, dict):
                return _fail(reply, "bad_request", "arguments must be an object")
            handler = self._handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                return _fail(reply, "bad_request", f"unknown control operation {op!r}")
            return handler(self, args, reply)
        except (ValueError, TypeError) as e:
            return _fail(reply, "bad_request", str(e))

    def _status(self, args: Args, reply: Reply) -> None:
        reply(self.group.status(), None)

    def _snapshot(self, args: Args, reply: Reply) -> None:
        reply({"ok": True, "state": self.group.snapshot().to_dict()}, None)

    def _write(self, args: Args, reply: Reply) -> None:
        """One state operation, forwarded to the leader by Raft."""
        def done(res: Result | None, code: str | None) -> None:
            if code is not None or res is None:
                return _fail(reply, code or "failed", f"write: {code}")
            reply(res, None)

        op, op_args = args.get("op"), args.get("args") or {}
        if not isinstance(op, str) or not isinstance(op_args, dict):
            return _fail(reply, "bad_request", "write needs an op name and an object of arguments")
        try:
            self.group.raft.submit(op, op_args, done)
        except ValueError:
            _fail(reply, "too_large", "arguments too large for one log entry")

    def _membership(self, args: Args, reply: Reply, adding: bool) -> None:
        address = check_address(str(args.get("address")))
        if (address in self.group.raft_members()) == adding:
            return _ok(reply, changed=False)
        self.group.change_raft_membership(address, adding)
        # The change commits only once the new member runs and catches up (for a
        # one-member cluster), so the caller polls ``status`` instead of waiting.
        _ok(reply, changed=True)

    def _add_node(self, args: Args, reply: Reply) -> None:
        self._membership(args, reply, adding=True)

    def _remove_node(self, args: Args, reply: Reply) -> None:
        self._membership(args, reply, adding=False)

    def _transfer(self, args: Args, reply: Reply) -> None:
        raft = self.group.raft
        if not raft.is_leader():
            return _fail(reply, "not_leader", f"leader is {raft.leader_address()}")

        def moved(code: str | None) -> None:
            if code is None:
                return _ok(reply)
            _fail(reply, code, "transfer refused (no caught-up follower?)")
        to = args.get("to")
        raft.transfer_leadership(to if isinstance(to, str) and to else None, moved)

    _handlers: dict[str, Handler] = {
        "status": _status,
        "snapshot": _snapshot,
        "write": _write,
        "add_node": _add_node,
        "remove_node": _remove_node,
        "transfer": _transfer,
    }


def _ok(reply: Reply, **fields: object) -> None:
    reply({"ok": True, **fields}, None)


def _fail(reply: Reply, code: str, error: str) -> None:
    reply({"ok": False, "code": code, "error": error}, None)
