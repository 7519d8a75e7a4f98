"""The one module that touches pysyncobj: a Raft member holding one replicated state
machine, the control channel on its port, and the client side of that channel.

pysyncobj's configuration, its failure reasons (turned into mq9's codes here), its entry
size limit and the private names it leaves no public way around stay in this file; the
metadata group (``metadata.py``) and the control channel (``control.py``,
``control_server.py``) see only ``RaftNode``, ``utility_call`` and plain values.

What pysyncobj pickles to disk: a journal entry is (method number, (op, args), {}) with
``op`` a str and ``args`` plain dicts, lists and tuples; the dump holds the dict that
``Machine.serialize`` returns. No class of mq9's is in either, so moving or renaming a
module never makes an old journal unreadable. There is one replicated method, ``apply``:
pysyncobj numbers replicated methods by their sorted names and writes the number into the
log, so adding a method would renumber the others and make an old journal replay the
wrong ones.

Callbacks run on pysyncobj's tick thread and get ``code``: None on success, else one of
``FAIL_CODES``' values.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.encryptor import HAS_CRYPTO
from pysyncobj.transport import TCPTransport
from pysyncobj.utility import TcpUtility, UtilityException

# A log entry this large would be split by pysyncobj, whose reassembly of split entries
# is unreliable; nothing the state needs comes close.
MAX_ENTRY_BYTES = 60_000
UTILITY_COMMAND = "mq9"  # the control channel's name among pysyncobj's utility commands

FAIL_CODES = {
    FAIL_REASON.QUEUE_FULL: "busy",
    FAIL_REASON.MISSING_LEADER: "no_leader",
    FAIL_REASON.DISCARDED: "retry",
    FAIL_REASON.NOT_LEADER: "retry",
    FAIL_REASON.LEADER_CHANGED: "retry",
    FAIL_REASON.REQUEST_DENIED: "denied",
    FAIL_REASON.UNKNOWN_OUTCOME: "retry",
}
RETRYABLE = {"busy", "no_leader", "retry"}

CAN_ENCRYPT: bool = HAS_CRYPTO  # a cluster secret needs the 'cryptography' package

# Plain values only cross this module (see above): an operation's arguments, what it or a
# control request answers.
Args = dict[str, object]
Result = dict[str, object]
# ``callback(result, code)`` of a write: result None unless code is None
WriteCallback = Callable[[Result | None, str | None], None]
# ``callback(code)`` of a membership change or a leadership transfer
DoneCallback = Callable[[str | None], None]
# how a control handler answers: ``reply(result, None)``
Reply = Callable[[Result, None], None]
# ``on_control(message, reply)``: message is the request after the command name
ControlHandler = Callable[[list[object], Reply], None]


def _code(err: object) -> str | None:
    if err is None or err == FAIL_REASON.SUCCESS:
        return None
    return FAIL_CODES.get(err, "failed")


def check_entry(op: str, args: Args) -> None:
    if len(pickle.dumps((op, args), protocol=2)) > MAX_ENTRY_BYTES:
        raise ValueError(f"{op}: arguments too large for one log entry")


@dataclass(frozen=True)
class RaftTiming:
    """pysyncobj timeouts, in seconds. pysyncobj's own defaults wait 5 s before
    reconnecting to a restarted peer, 30 s before a leader cut off from the majority
    steps down, and cache DNS for 10 minutes (a restarted pod's new IP stays unknown);
    these are tuned down for a LAN."""

    append_entries_period: float = 0.1   # leader heartbeat
    raft_min_timeout: float = 1.0        # election timeout range
    raft_max_timeout: float = 2.0
    connection_timeout: float = 3.5      # silence before a peer connection counts as dead
    connection_retry_time: float = 0.5
    leader_fallback_timeout: float = 5.0
    dns_cache_time: float = 10.0
    auto_tick_period: float = 0.05

    @classmethod
    def fast(cls) -> RaftTiming:
        """For tests on one machine: elections in well under a second."""
        return cls(append_entries_period=0.05, raft_min_timeout=0.3, raft_max_timeout=0.6,
                   connection_timeout=2.0, connection_retry_time=0.1,
                   leader_fallback_timeout=1.5, dns_cache_time=1.0, auto_tick_period=0.02)


class Machine(Protocol):
    """The replicated object, in plain Python: ``apply`` must not raise (pysyncobj would
    retry the same entry forever) and must be deterministic."""

    def apply(self, op: str, args: Args) -> Result: ...

    def serialize(self) -> dict[str, object]: ...

    def deserialize(self, data: dict[str, object]) -> None: ...


# pysyncobj has no type stubs: its classes are Any to mypy, which strict mode refuses as bases.
class _Consumer(SyncObjConsumer):  # type: ignore[misc]
    def __init__(self, machine: Machine):
        # set before SyncObjConsumer.__init__, which marks existing attributes as
        # not-replicated (excluded from snapshots)
        self._machine = machine
        super().__init__()

    @replicated  # type: ignore[untyped-decorator]  # untyped decorator (pysyncobj has no stubs)
    def apply(self, op: str, args: Args) -> Result:
        return self._machine.apply(op, args)

    def _serialize(self) -> dict[str, object]:
        return self._machine.serialize()

    def _deserialize(self, data: dict[str, object]) -> None:
        self._machine.deserialize(data)


class _Transport(TCPTransport):  # type: ignore[misc]  # pysyncobj has no type stubs
    """pysyncobj's TCP transport plus mq9's utility command on the same port."""

    handler: ControlHandler | None = None  # set per RaftNode by a subclass made in RaftNode.__init__

    def __init__(self, syncObj: object, selfNode: object, otherNodes: object):
        super().__init__(syncObj, selfNode, otherNodes)
        self.setOnUtilityMessageCallback(UTILITY_COMMAND, self.handler)


class RaftNode:
    """One started pysyncobj member at ``address`` (host:port others use), listening on
    ``bind``, with its journal and dump in ``directory``. ``on_control(message, reply)``
    answers control requests (``reply(result, None)``); ``on_tick()`` runs on every tick."""

    def __init__(self, address: str, partners: list[str], *, bind: str, directory: str,
                 password: str | None, timing: RaftTiming, machine: Machine,
                 on_control: ControlHandler, on_tick: Callable[[], None]):
        t = timing
        conf = SyncObjConf(
            dynamicMembershipChange=True,
            journalFile=os.path.join(directory, "raft.journal"),
            fullDumpFile=os.path.join(directory, "raft.dump"),
            password=password,
            bindAddress=bind,
            appendEntriesPeriod=t.append_entries_period,
            raftMinTimeout=t.raft_min_timeout,
            raftMaxTimeout=t.raft_max_timeout,
            connectionTimeout=t.connection_timeout,
            connectionRetryTime=t.connection_retry_time,
            leaderFallbackTimeout=t.leader_fallback_timeout,
            dnsCacheTime=t.dns_cache_time,
            dnsFailCacheTime=min(2.0, t.dns_cache_time),
            autoTickPeriod=t.auto_tick_period,
            # Metadata writes are rare and small; without batching the leader sends each
            # entry at once instead of on the next heartbeat (2 ms instead of ~100 ms).
            appendEntriesUseBatch=False,
            # fork() in a process with other threads can deadlock the child on a lock
            # some thread held; the state pickles in milliseconds, so dump inline.
            useFork=False,
            maxBindRetries=0,
        )
        self.address = address
        self._consumer = _Consumer(machine)
        transport = type("_BoundTransport", (_Transport,), {"handler": on_control})
        self._obj = SyncObj(address, partners, conf, consumers=[self._consumer],
                            transportClass=transport)
        # pysyncobj stops its tick thread once the thread that built it ends, and has no
        # option against it; a group started from a short-lived thread would silently stop.
        self._obj._SyncObj__mainThread = threading.main_thread()
        self._obj.addOnTickCallback(on_tick)

    # ---- writes and membership (callbacks on the tick thread) ----------------------------

    def submit(self, op: str, args: Args, callback: WriteCallback) -> None:
        """Appends ``apply(op, args)`` through the leader; ``callback(result, code)``."""
        check_entry(op, args)
        self._consumer.apply(op, args, callback=lambda res, err: callback(res, _code(err)))

    def add_node(self, address: str, callback: DoneCallback) -> None:
        self._obj.addNodeToCluster(address, callback=lambda res, err: callback(_code(err)))

    def remove_node(self, address: str, callback: DoneCallback) -> None:
        self._obj.removeNodeFromCluster(address, callback=lambda res, err: callback(_code(err)))

    @property
    def can_transfer(self) -> bool:
        return hasattr(self._obj, "transferLeadership")

    def transfer_leadership(self, to: str | None, callback: DoneCallback) -> None:
        """Only on the tick thread: pysyncobj reads and sends Raft state directly."""
        self._obj.transferLeadership(to, callback=lambda res, err: callback(_code(err)))

    def compact(self) -> None:
        """Writes the dump and trims the journal on the next tick (tests)."""
        self._obj.forceLogCompaction()

    # ---- reads ---------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return bool(self._obj.isReady())

    def is_leader(self) -> bool:
        return bool(self._obj._isLeader())  # getStatus() would build a 20-key dict per call

    def leader_address(self) -> str | None:
        leader = self._obj._getLeader()
        return cast(str, leader.address) if leader is not None else None

    def peer_addresses(self) -> frozenset[str]:
        return frozenset(n.address for n in self._obj.otherNodes)

    def peers(self) -> dict[str, bool]:
        """Every other Raft member's address -> connected now."""
        obj = self._obj
        return {n.address: obj.isNodeConnected(n) for n in obj.otherNodes}

    @property
    def term(self) -> int:
        return int(self._obj.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self._obj.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        return int(self._obj.raftLastApplied)

    @property
    def has_quorum(self) -> bool:
        return bool(self._obj.hasQuorum)

    def destroy(self, wait: float = 0.0) -> None:
        """Stops the member; ``wait`` seconds for its tick thread to end (0: don't, as
        on the tick thread itself)."""
        self._obj.destroy()
        if wait:
            self._obj._SyncObj__thread.join(wait)


class UtilityError(Exception):
    """No answer: refused, timed out or dropped (pysyncobj does not say which)."""


def utility_call(address: str, message: list[object], *, password: str | None,
                 timeout: float) -> object:
    """Sends ``[UTILITY_COMMAND, *message]`` to the member at ``address``: its reply, or
    None when the connect failed at once. Raises ImportError (a password without the
    'cryptography' package) and UtilityError."""
    util = TcpUtility(password=password, timeout=timeout)
    try:
        return util.executeCommand(address, [UTILITY_COMMAND, *message])
    except UtilityException as e:
        raise UtilityError(str(e)) from None
