"""What the handler modules of a shard (ops, subscriptions, moves, listing, pump) may use of
the ``Shard`` they are mixed into: its state, set up in ``Shard.__init__`` (batch.py), and the
helpers one module provides to the others. Each handler class subclasses ``ShardCore``, so a
module that reaches for anything not declared here is a type error, and ``Shard`` must
provide all of it."""

from __future__ import annotations

from typing import Protocol

from mq9 import wire
from mq9.shard.state import Mailbox, Sub, Subscribers
from mq9.shard.store import LoadedMailbox, Record, Store

# The answers and pushes of one batch, per gateway identity.
Outputs = dict[bytes, list[wire.FromShard]]


class Request(Protocol):
    """An operation on one mailbox, answered by ``rid``."""

    @property
    def rid(self) -> int: ...

    @property
    def mail_id(self) -> str: ...


class ShardCore(Protocol):
    store: Store
    max_msgs: int
    window: int  # messages in flight per mailbox
    now: float  # the batch's clock (unix seconds)
    now_ms: int
    mailboxes: dict[str, Mailbox]
    groups: dict[str, Subscribers]  # mail_id -> its owner subscriptions
    subs: dict[bytes, dict[int, Sub]]  # gw -> key -> Sub
    total_msgs: int
    total_bytes: int
    corrupt: int  # unreadable records dropped
    frozen: set[int]  # slots not served
    by_slot: dict[int, set[str]]  # slot -> mail_ids in memory
    importing: dict[int, set[str]]  # slot -> mail_ids written by Import, not loaded yet
    # A mid-batch commit failed. (The default keeps mypy from taking the type of the first
    # assignment in a handler module for the declared one.)
    write_error: Exception | None = None
    # Per batch:
    out: Outputs
    dirty: set[Mailbox]  # to pump at the end of the batch
    fresh: dict[tuple[str, int], Record]  # records written this batch, not yet readable
    sends_ok: int

    # batch.py
    def _reply(self, gw: bytes, item: wire.FromShard) -> None: ...
    def _count(self, op: str, result: str, n: int = 1) -> None: ...
    def _live(self, mail_id: str) -> Mailbox | None: ...
    def _moved(self, gw: bytes, op: Request, name: str) -> bool: ...
    def _build(self, box: LoadedMailbox) -> Mailbox: ...
    def _add_mailbox(self, mb: Mailbox) -> None: ...
    def _drop_mailbox(self, mb: Mailbox) -> None: ...
    def _forget(self, mb: Mailbox) -> None: ...

    # ops.py
    def _remove_message(self, mb: Mailbox, mid: int) -> None: ...

    # subscriptions.py
    def _mark_delivered(self, mb: Mailbox, ids: list[int]) -> None: ...

    # pump.py
    def _record(self, mail_id: str, mid: int) -> Record: ...
