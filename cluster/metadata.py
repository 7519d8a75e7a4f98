"""The metadata group: ``ClusterState`` replicated by Raft (pysyncobj).

Each node runs one ``MetadataGroup``. Reads (``snapshot``, ``status``) come from the local
replica and never block; writes go through the Raft leader and block until this replica
has applied them. A group of N members keeps working while a majority is up.

Ports: one, the node's ``--cluster-port``. It carries Raft traffic and, as pysyncobj
"utility" messages, the control channel (``control.py``, answered by ``control_server.py``):
``status``, ``snapshot``, ``write``, ``add_node``, ``remove_node``, ``transfer``. Raft itself
is pysyncobj behind ``raft.RaftNode``, the only module that touches it.

Files, in ``<data_dir>/cluster/``:
  raft.journal(.meta)  pysyncobj's log, current term and vote (``raft.py``)
  raft.dump            pysyncobj's snapshot after log compaction (our state as a dict)
  node.json            who this node is and its Raft peers (``local_files.py``)
  state.json           the latest ClusterState as JSON, for gateways (``local_files.py``)

How a node joins (``join(seed)``), on the wire:
  1. ``status`` to the seed (any member): cluster id, Raft members, state members.
  2. ``add_node {address}`` to the seed until the seed's Raft configuration lists this
     node. pysyncobj forwards the membership change to the leader, which applies it on
     append. Only then does this node start its own Raft instance, with every member as
     a partner: a node that runs before it is a member keeps timing out, raises its term
     and, once added, forces a needless election.
  3. wait until this replica has caught up, then the replicated ``add_member`` write
     records node id, ports and shard count in the state; the leader's ``Rebalancer``
     then moves slots to it.

Thread rules: pysyncobj applies entries, runs ``on_change`` callbacks and answers control
requests on its own tick thread. Never block that thread: the blocking write helpers refuse
to run on it.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol, Unpack

from mq9 import log
from mq9.cluster import raft
from mq9.cluster import state as st
from mq9.cluster.control import ControlError, call, call_retry, check_address
from mq9.cluster.control_server import ControlServer
from mq9.cluster.local_files import NodeFile, NodeRecord, StateFileWriter, saved_node_id
from mq9.cluster.raft import Args, DoneCallback, RaftNode, RaftTiming, Result
from mq9.cluster.state import ClusterState, StateError

__all__ = ["ClusterError", "MetadataGroup", "RaftTiming", "WriteTimeout", "default_node_id",
           "from_config"]

DEFAULT_CLUSTER_PORT = 6222


class ClusterError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class WriteTimeout(ClusterError):
    """No answer in time. The write may still be applied later (it is idempotent, so
    retrying is safe)."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


def default_node_id(data_dir: str, cluster_port: int = DEFAULT_CLUSTER_PORT) -> str:
    """The id this data dir already has; else the host name, which is stable for a
    StatefulSet pod (mq9-0, mq9-1...). Several nodes on one host differ by port."""
    saved = saved_node_id(os.path.join(data_dir, "cluster"))
    if saved:
        return saved
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-.")
    name = name[:50] or "mq9"
    return name if cluster_port == DEFAULT_CLUSTER_PORT else f"{name}-{cluster_port}"


def default_advertise(bind_host: str) -> str:
    """Where other members reach this one. A specific bind address is used as is. For a
    wildcard bind: the FQDN when it resolves to a non-loopback address (stable across pod
    restarts, unlike the IP), else this host's address, else loopback. Pass --advertise
    where neither is right (NAT, several interfaces)."""
    if bind_host not in ("", "0.0.0.0", "::", "[::]"):
        return bind_host
    fqdn = socket.getfqdn()
    try:
        ip = socket.gethostbyname(fqdn)
    except OSError:
        return "127.0.0.1"
    if ip.startswith("127."):
        return "127.0.0.1"
    return fqdn if "." in fqdn else ip


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


class GroupConfig(Protocol):
    """What ``from_config`` reads of an ``mq9.config.Config`` (not imported: the metadata
    modules import only each other and ``mq9.log``)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def cluster_port(self) -> int: ...
    @property
    def data_dir(self) -> str: ...
    @property
    def shards(self) -> int: ...
    @property
    def gateway_count(self) -> int: ...
    @property
    def node_id(self) -> str | None: ...
    @property
    def advertise(self) -> str | None: ...
    @property
    def cluster_secret(self) -> str | None: ...


# ``callback(state, op)`` after a change this replica applied
ChangeCallback = Callable[[ClusterState, str], None]


def from_config(cfg: GroupConfig, *, node_id: str | None = None, advertise: str | None = None,
                secret: str | None = None, timing: RaftTiming | None = None) -> MetadataGroup:
    """A group for an ``mq9.config.Config``: cluster port on the NATS listen host, data
    in the node's data dir, this node's NATS port, shard and gateway counts; node id and
    advertise host from the arguments, else from the config. Open it with
    ``.open(join=cfg.join)``."""
    if not cfg.cluster_port:
        raise ClusterError("bad_request", "cluster_port 0 means no cluster: no metadata group")
    return MetadataGroup(node_id or cfg.node_id,
                         f"{cfg.host}:{cfg.cluster_port}",
                         advertise or cfg.advertise, cfg.data_dir,
                         password=secret or cfg.cluster_secret,
                         nats_port=cfg.port, shards=cfg.shards,
                         gateways=cfg.gateway_count, timing=timing)


class _StateMachine:
    """The replicated object (``raft.Machine``): the cluster state and its transitions."""

    def __init__(self, on_applied: Callable[[str, ClusterState], None]):
        self._on_applied = on_applied
        self.state = ClusterState()

    def apply(self, op: str, args: Args) -> Result:
        # An exception here would stop pysyncobj applying the log for good (it retries
        # the same entry forever), so every failure becomes a result.
        try:
            new, result = st.apply(self.state, op, args)
        except StateError as e:
            return {"ok": False, "code": e.code, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a transition's bug: refuse it on every replica
            log.exception("metadata_apply_failed", op=op)
            return {"ok": False, "code": "internal", "error": f"{type(e).__name__}: {e}"}
        if new is not self.state:
            self.state = new
            self._on_applied(op, new)
        return {"ok": True, "version": new.version, **result}

    def serialize(self) -> dict[str, object]:
        return {"state": self.state.to_dict()}

    def deserialize(self, data: dict[str, object]) -> None:
        saved = data["state"]
        if not isinstance(saved, dict):
            raise ValueError("a Raft dump without a state")
        self.state = ClusterState.from_dict(saved)
        self._on_applied("restore", self.state)


class MetadataGroup:
    def __init__(self, node_id: str | None = None, bind: str = f"0.0.0.0:{DEFAULT_CLUSTER_PORT}",
                 advertise: str | None = None, data_dir: str = "./mq9-data",
                 partners: Iterable[str] = (), password: str | None = None, *, nats_port: int = 4222,
                 shards: int = 2, gateways: int = 0, timing: RaftTiming | None = None,
                 snapshot_file: str | bool = True):
        """``bind`` is host:cluster_port to listen on; ``advertise`` the host others use
        (port = cluster_port). ``partners``: Raft addresses of existing members, normally
        left empty (``join`` finds them, a restart reads them from node.json)."""
        check_address(bind)
        self.bind = bind
        bind_host, port = bind.rsplit(":", 1)
        self.cluster_port = int(port)
        self.data_dir = os.path.abspath(data_dir)
        self.dir = os.path.join(self.data_dir, "cluster")
        self.node_id = node_id or default_node_id(self.data_dir, self.cluster_port)
        st.check_node_id(self.node_id)
        self.advertise = advertise or default_advertise(bind_host)
        self.address = f"{self.advertise}:{self.cluster_port}"
        self.password = password or None
        if self.password and not raft.CAN_ENCRYPT:
            raise ClusterError("unavailable", "a cluster secret needs the 'cryptography' package")
        if not self.password and not _is_loopback(bind_host):
            # Without a secret pysyncobj unpickles whatever reaches the port: only this
            # machine may reach it (in-process tests); `mq9 node` always has a secret.
            raise ClusterError("bad_request", f"listening on {bind_host} needs a cluster secret")
        self.member_info: dict[str, object] = {"advertise": self.advertise, "cluster_port": self.cluster_port,
                            "nats_port": nats_port, "shards": shards, "gateways": gateways}
        self.timing = timing or RaftTiming()
        self._partners = [p for p in partners if p != self.address]
        for p in self._partners:
            check_address(p)
        if snapshot_file is True:
            snapshot_file = os.path.join(self.dir, "state.json")
        self.snapshot_file = snapshot_file or None

        self._raft: RaftNode | None = None
        self._sm = _StateMachine(self._applied)
        self._control = ControlServer(self)
        self._callbacks: list[ChangeCallback] = []
        self._removed_callbacks: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._tick_ident: int | None = None
        self._peers_saved: frozenset[str] | None = None
        self._last_leader: str | None = None
        self._was_member = False
        self.removed = False
        self._node_file = NodeFile(self.dir)
        self._tick_calls: list[Callable[[], None]] = []  # work that must run on pysyncobj's thread
        # address -> last Raft change asked: {"op", "result"}
        self.membership_results: dict[str, dict[str, str]] = {}
        self._closed = threading.Event()
        self._state_file = (StateFileWriter(self.snapshot_file, lambda: self._sm.state)
                            if self.snapshot_file else None)
        self.log = log.bind(node=self.node_id)

    # ---- lifecycle -------------------------------------------------------------------

    def open(self, join: str | None = None, timeout: float = 60.0,
             rejoin: bool = False) -> MetadataGroup:
        """Starts the right way for this data dir: a restart from disk (``join`` is
        ignored: the data dir knows the cluster), a join through ``join``, or a new
        single-member cluster. A data dir of a removed member raises ClusterError
        "removed" unless ``rejoin``: a restart with the flags it always had (a
        StatefulSet's) must not undo ``mq9 cluster remove``."""
        if join and self._is_self(join):
            # lets every pod of a StatefulSet get the same --join (pod 0's address):
            # pod 0 then bootstraps, or restarts from its data dir
            join = None
        local = self._read_node_file()
        if local and local.get("removed"):
            peers = [p for p in local.get("peers", []) if p != self.address]
            if not rejoin:
                raise ClusterError("removed", f"{self.node_id} was removed from its cluster "
                                   f"{local.get('cluster_id') or ''}; it stays out until started "
                                   f"with --rejoin (which discards its old cluster data in "
                                   f"{self.dir} and joins again)")
            join = join or (peers[0] if peers else None)
            if not join:
                raise ClusterError("bad_request", "--rejoin needs --join: no other member "
                                   "is known")
            self._wipe()
            local = {}
        if local and not local.get("joining"):
            if join:
                self.log.info("cluster_join_ignored", reason="data dir already holds a member",
                              seed=join)
            if not rejoin and self._removed_while_away(local):
                self._node_file.replace({**local, "removed": True})
                raise ClusterError("removed", f"{self.node_id} was removed from its cluster "
                                   f"{local.get('cluster_id') or ''} while it was down; it "
                                   f"stays out until started with --rejoin")
            self.start()
            if not self._partners and not local.get("peers"):
                self.bootstrap(timeout=timeout)  # a lone node that crashed before bootstrap
            try:
                self.sync(min(timeout, 10.0))
            except ClusterError as e:
                # Without a quorum there is nothing newer to catch up with; serve the
                # local replica and let Raft catch up when the others are back.
                self.log.warning("metadata_stale_start", code=e.code, error=str(e))
            return self
        if local.get("joining") and not join:
            peers = [p for p in local.get("peers", []) if p != self.address]
            if not peers:
                raise ClusterError("bad_request", "an interrupted join needs --join")
            join = peers[0]
        if join:
            return self.join(join, timeout=timeout)
        self.start()
        self.bootstrap(timeout=timeout)
        return self

    def start(self) -> MetadataGroup:
        """Starts the Raft member with the partners given or saved in node.json."""
        if self._raft is not None:
            return self
        os.makedirs(self.dir, exist_ok=True)
        local = self._read_node_file()
        if local:
            if local.get("node_id") not in (None, self.node_id):
                raise ClusterError("bad_request", f"{self.dir} belongs to node "
                                   f"{local['node_id']}, not {self.node_id}")
            if local.get("address") not in (None, self.address):
                raise ClusterError("bad_request", (
                    f"this node was {local['address']} and is now {self.address}; members "
                    f"know each other by address, so keep --advertise stable (a DNS name)"))
        partners = sorted(set(self._partners) | set(local.get("peers", ())) - {self.address})
        self._node_file.replace({"node_id": self.node_id, "address": self.address,
                                 "cluster_id": local.get("cluster_id", ""), "peers": partners,
                                 "joining": bool(local.get("joining")), "removed": False})
        self.log.info("metadata_starting", address=self.address, bind=self.bind,
                      partners=",".join(partners) or "-", data_dir=self.dir)
        self._raft = RaftNode(self.address, partners, bind=self.bind, directory=self.dir,
                              password=self.password, timing=self.timing, machine=self._sm,
                              on_control=self._control.handle, on_tick=self._on_tick)
        if self._state_file is not None:
            self._state_file.start()
        return self

    def bootstrap(self, timeout: float = 30.0) -> None:
        """Makes this lone member the whole cluster: it owns every slot. Does nothing if
        the state is already bootstrapped."""
        self._require_started()
        deadline = time.monotonic() + timeout
        if not self.wait_for(lambda s: s.bootstrapped or self.is_leader(), timeout):
            raise ClusterError("timeout", "no leader to bootstrap the cluster with")
        if not self._sm.state.bootstrapped:
            self.write("bootstrap", {"cluster_id": uuid.uuid4().hex, "node_id": self.node_id,
                                     "info": {**self.member_info, "joined_at": time.time()}},
                       timeout=max(1.0, deadline - time.monotonic()))
        self._save_cluster_id()

    def join(self, seed: str, timeout: float = 60.0) -> MetadataGroup:
        """Joins the cluster that ``seed`` (any member's host:cluster_port) belongs to."""
        try:
            return self._join(seed, timeout)
        except ControlError as e:
            raise ClusterError(e.code, f"joining through {seed}: {e}") from None

    def _join(self, seed: str, timeout: float) -> MetadataGroup:
        check_address(seed)
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.5, deadline - time.monotonic())

        local = self._read_node_file()
        if local and local.get("removed"):
            self._wipe()
            local = {}
        if local and not local.get("joining"):
            return self.start()  # already a member: a restart
        while True:
            info = call_retry(seed, "status", password=self.password, timeout=left())
            if info.get("cluster_id"):
                break
            if time.monotonic() > deadline:  # the seed itself is still starting up
                raise ClusterError("timeout", f"{seed} has no bootstrapped cluster")
            time.sleep(0.2)
        cid = info["cluster_id"]
        if local.get("cluster_id") and local["cluster_id"] != cid:
            raise ClusterError("bad_request", f"{self.dir} belongs to cluster "
                               f"{local['cluster_id']}, {seed} to {cid}")
        known = info["members"].get(self.node_id)
        if known and known["address"] != self.address:
            raise ClusterError("exists", f"node id {self.node_id} is already used by "
                               f"{known['address']}; pick another --node-id")
        for nid, m in info["members"].items():
            if m["address"] == self.address and nid != self.node_id:
                raise ClusterError("exists", f"{self.address} is already member {nid}")
        os.makedirs(self.dir, exist_ok=True)
        self._node_file.replace({"node_id": self.node_id, "address": self.address,
                                 "cluster_id": cid,
                                 "peers": sorted(set(info["raft_members"]) - {self.address}),
                                 "joining": True, "removed": False})
        self.log.info("cluster_joining", seed=seed, cluster_id=cid)
        asked = 0.0
        while self.address not in info["raft_members"]:
            if time.monotonic() > deadline:
                raise ClusterError("timeout", f"{seed} did not add {self.address}: "
                                   f"{info.get('membership_results', {}).get(self.address)}")
            if time.monotonic() - asked > 2.0:  # a lost or refused request is asked again
                try:
                    call(seed, "add_node", {"address": self.address}, password=self.password,
                         timeout=min(2.0, left()))
                except ControlError as e:
                    if e.code not in ("unreachable", "unauthenticated", "denied", "no_leader",
                                      "retry"):
                        raise ClusterError(e.code, str(e)) from None
                asked = time.monotonic()
            time.sleep(0.05)
            info = call_retry(seed, "status", password=self.password, timeout=left())
        self._partners = sorted(set(info["raft_members"]) - {self.address})
        self._write_node_file(peers=self._partners)
        self.start()
        if not self.wait_ready(left()):
            raise ClusterError("timeout", "joined the Raft group but did not catch up")
        self.write("add_member", {"node_id": self.node_id,
                                  "info": {**self.member_info, "joined_at": time.time()}},
                   timeout=left())
        self._save_cluster_id()
        self.log.info("cluster_joined", cluster_id=cid, members=len(self._sm.state.members))
        return self

    def _removed_while_away(self, local: NodeRecord) -> bool:
        """Whether a caught-up member of our cluster says we are no longer one of them
        (`mq9 cluster remove --force` while this node was down). Starting Raft anyway
        would serve stale slots and disturb the group with elections it cannot win.
        False when nobody answers: the whole cluster may be restarting."""
        for peer in local.get("peers", ()):
            if peer == self.address:
                continue
            try:
                s = call(peer, "status", password=self.password, timeout=2.0)
            except (ControlError, ValueError):
                continue
            if (s.get("cluster_id") != local.get("cluster_id") or not s.get("ready")
                    or not s.get("leader")):
                continue
            return self.node_id not in s["members"] and self.address not in s["raft_members"]
        return False

    def _is_self(self, address: str) -> bool:
        host, port = check_address(address).rsplit(":", 1)
        if int(port) != self.cluster_port:
            return False
        if host == self.advertise:
            return True
        try:
            return socket.gethostbyname(host) == socket.gethostbyname(self.advertise)
        except OSError:
            return False

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._raft is not None:
            node, self._raft = self._raft, None
            node.destroy(wait=5.0 if threading.get_ident() != self._tick_ident else 0.0)
        if self._state_file is not None:
            self._state_file.close()

    # ---- reads (local replica) -------------------------------------------------------

    def snapshot(self) -> ClusterState:
        return self._sm.state

    def is_ready(self) -> bool:
        """True once this replica has caught up with the leader's log (stays true)."""
        return self._raft is not None and self._raft.is_ready()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_ready() and self.leader_address() is not None:
                return True
            time.sleep(0.02)
        return False

    def is_leader(self) -> bool:
        return self._raft is not None and self._raft.is_leader()

    def leader_address(self) -> str | None:
        return self._raft.leader_address() if self._raft is not None else None

    def leader(self) -> str | None:
        """The leader's node id (its address while it is not in the state yet)."""
        addr = self.leader_address()
        if addr is None:
            return None
        return self._sm.state.node_at(addr) or addr

    def term(self) -> int:
        return self._raft.term if self._raft is not None else 0

    def raft_members(self) -> list[str]:
        if self._raft is None:
            return []
        return sorted(set(self._raft.peers()) | {self.address})

    def connected_peers(self) -> list[str]:
        if self._raft is None:
            return []
        return sorted(a for a, up in self._raft.peers().items() if up)

    @property
    def raft(self) -> RaftNode:
        """The started Raft member (for the control server and tests)."""
        return self._started()

    def status(self) -> Result:
        for _ in range(5):
            try:
                return self._status()
            except RuntimeError:  # a set changed size under us on the tick thread
                time.sleep(0.001)
        return self._status()

    def _status(self) -> Result:
        node = self._raft
        s = self._sm.state
        if node is None:
            raise ClusterError("unavailable", "metadata group not started")
        others = node.peers()
        raft = set(others) | {self.address}
        per_node = st.slots_per_node(s)
        per_shard = st.slots_per_shard(s)
        members: dict[str, dict[str, object]] = {}
        for nid, info in sorted(s.members.items()):
            addr = st.raft_address(info)
            members[nid] = {**info, "address": addr, "slots": per_node.get(nid, 0),
                            "slots_per_shard": per_shard.get(nid, []),
                            "raft": ("self" if addr == self.address
                                     else "connected" if others.get(addr)
                                     else "disconnected" if addr in others else "absent")}
        state_addrs = {m["address"] for m in members.values()}
        moves = [{"slot": slot, **m} for slot, m in sorted(s.moves.items())]
        leader_addr = self.leader_address()
        return {
            "ok": True,
            "node_id": self.node_id,
            "address": self.address,
            "cluster_id": s.cluster_id,
            "version": s.version,
            "ready": node.is_ready(),
            "role": "leader" if node.is_leader() else ("follower" if leader_addr else "candidate"),
            "leader": (s.node_at(leader_addr) or leader_addr) if leader_addr else None,
            "leader_address": leader_addr,
            "term": node.term,
            "commit_index": node.commit_index,
            "last_applied": node.last_applied,
            "has_quorum": node.has_quorum,
            "raft_members": sorted(raft),
            "raft_only": sorted(raft - state_addrs),
            "members": members,
            "slots_per_node": per_node,
            "unassigned_slots": sum(1 for n, _ in s.slots if n not in s.members),
            "moves": moves[:100],
            "moves_total": len(moves),
            "moves_by_state": {k: sum(1 for m in moves if m["state"] == k) for k in st.MOVE_STATES},
            "queue_groups": sum(len(g) for g in s.queue_groups.values()),
            "membership_results": dict(self.membership_results),
        }

    # ---- change notification ---------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """``callback(state, op)`` after each change this replica applies (op "restore"
        after loading a Raft snapshot). Runs on pysyncobj's thread: keep it short and
        never write to the group from it."""
        self._callbacks.append(callback)

    def on_removed(self, callback: Callable[[], None]) -> None:
        """``callback()`` once, when the state no longer lists this node."""
        self._removed_callbacks.append(callback)

    def wait_for(self, predicate: Callable[[ClusterState], object], timeout: float) -> bool:
        """Waits until ``predicate(state)`` holds on the local replica."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self._sm.state):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    return False
                # Woken by changes; the short cap also re-checks predicates that depend
                # on Raft status (leadership) rather than on the state.
                self._cond.wait(min(left, 0.05))

    def _applied(self, op: str, state: ClusterState) -> None:
        if self._state_file is not None:
            self._state_file.changed()
        for cb in list(self._callbacks):
            try:
                cb(state, op)
            except Exception:
                self.log.exception("metadata_callback_failed", op=op)
        if self.node_id in state.members:
            self._was_member = True
        elif (self._was_member and state.bootstrapped and not self.removed
              and self._raft is not None and self._raft.is_ready()):
            # Only once caught up: a member that rejoined replays the log of its earlier
            # removal on the way to its new add_member.
            self.removed = True
            self._write_node_file(removed=True)
            self.log.info("metadata_removed_from_cluster")
            for removed in list(self._removed_callbacks):
                try:
                    removed()
                except Exception:
                    self.log.exception("metadata_callback_failed", op="removed")
        with self._cond:
            self._cond.notify_all()

    def _on_tick(self) -> None:
        self._tick_ident = threading.get_ident()
        node = self._raft
        if node is None:
            return
        while self._tick_calls:
            fn = self._tick_calls.pop(0)
            try:
                fn()
            except Exception:
                self.log.exception("metadata_tick_call_failed")
        peers = node.peer_addresses()
        if peers != self._peers_saved:
            # Raft's configuration changes take effect when appended, so the list saved
            # for the next start follows pysyncobj's view, not the committed state.
            self._peers_saved = peers
            self._write_node_file(peers=sorted(peers))
        leader = node.leader_address()
        if leader != self._last_leader:
            self._last_leader = leader
            self.log.info("metadata_leader", leader=leader, term=node.term,
                          self_leader=node.is_leader())
            with self._cond:
                self._cond.notify_all()

    # ---- writes (through the leader) -------------------------------------------------

    def write(self, op: str, args: Args | None = None, timeout: float = 10.0) -> Result:
        """Applies one state operation through the leader and returns its result once
        this replica has applied it. Retries while there is no leader or the leader
        changes. Raises StateError (refused), WriteTimeout, ClusterError."""
        node = self._started()
        if threading.get_ident() == self._tick_ident:
            raise RuntimeError("metadata writes block; never issue them on pysyncobj's thread")
        args = args or {}
        raft.check_entry(op, args)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            done = threading.Event()
            box = _Answer()

            def cb(res: Result | None, code: str | None, box: _Answer = box,
                   done: threading.Event = done) -> None:
                box.result, box.code = res, code
                done.set()

            node.submit(op, args, cb)
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise WriteTimeout(f"{op}: no answer in {timeout:.1f}s "
                                   f"(leader {self.leader_address()})")
            code = box.code
            if code is None and box.result is not None:
                res = box.result
                if not res["ok"]:
                    raise StateError(str(res["code"]), str(res["error"]))
                return res
            code = code or "failed"
            if code not in raft.RETRYABLE or time.monotonic() + delay > deadline:
                raise ClusterError(code, f"{op}: {code}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def set_lame_duck(self, lame_duck: bool = True, timeout: float = 10.0) -> Result:
        """Marks this node as in lame-duck mode (or not) in the state."""
        return self.write("set_lame_duck", {"node_id": self.node_id, "lame_duck": lame_duck},
                          timeout)

    def sync(self, timeout: float = 10.0) -> None:
        """Read barrier: returns once this replica has applied every write committed
        before the call. (A restarted replica only knows the commit index it saved, up
        to a second old, until the leader tells it more.)"""
        self.write("noop", {}, timeout)

    # ---- Raft membership -------------------------------------------------------------

    def _raft_call(self, what: str, start: Callable[[DoneCallback], None], timeout: float,
                   on_tick: bool = False) -> None:
        """``start(callback)`` begins a Raft change; waits for ``callback(code)``."""
        if threading.get_ident() == self._tick_ident:
            raise RuntimeError("never block pysyncobj's thread")
        done, box = threading.Event(), _Answer()

        def cb(code: str | None) -> None:
            box.code = code
            done.set()

        if on_tick:  # reads and sends Raft state directly: not safe from other threads
            self._tick_calls.append(lambda: start(cb))
        else:
            start(cb)
        if not done.wait(timeout):
            raise WriteTimeout(f"{what}: no answer in {timeout:.1f}s")
        if box.code is not None:
            raise ClusterError(box.code, f"{what}: {box.code}")

    def add_raft_node(self, address: str, timeout: float = 10.0) -> None:
        """The Raft half of adding a member (``join`` asks a seed to do this)."""
        node = self.raft
        if address not in self.raft_members():
            self._raft_call("add_node", lambda cb: node.add_node(address, cb), timeout)

    def remove_raft_node(self, address: str, timeout: float = 10.0) -> None:
        """The Raft half of removing a member. The leader cannot remove itself:
        ``transfer_leadership`` first."""
        node = self.raft
        if address in self.raft_members():
            self._raft_call("remove_node", lambda cb: node.remove_node(address, cb), timeout)

    def change_raft_membership(self, address: str, adding: bool) -> None:
        """Starts adding or removing ``address`` without waiting; the outcome shows in
        ``status()["membership_results"]``. Safe on pysyncobj's thread."""
        op = "add_node" if adding else "remove_node"

        def changed(code: str | None) -> None:
            result = "ok" if code is None else code
            self.membership_results[address] = {"op": op, "result": result}
            self.log.info("metadata_membership", op=op, address=address, result=result)
        (self.raft.add_node if adding else self.raft.remove_node)(address, changed)

    def transfer_leadership(self, to: str | None = None, timeout: float = 10.0) -> None:
        """Asks this node, the leader, to hand over (to a caught-up follower, or ``to``)
        and waits until someone else leads."""
        node = self.raft
        if not node.can_transfer:
            raise ClusterError("unavailable", "this pysyncobj has no leadership transfer")
        self._raft_call("transfer", lambda cb: node.transfer_leadership(to, cb), timeout,
                        on_tick=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.leader_address() not in (None, self.address):
                return
            time.sleep(0.02)
        raise WriteTimeout("leadership did not move")

    # ---- files -----------------------------------------------------------------------

    def _require_started(self) -> None:
        self._started()

    def _started(self) -> RaftNode:
        if self._raft is None:
            raise ClusterError("unavailable", "metadata group not started")
        return self._raft

    def _read_node_file(self) -> NodeRecord:
        try:
            return self._node_file.read()
        except (OSError, ValueError) as e:
            raise ClusterError("bad_request", f"{self._node_file.path}: {e}") from None

    def _write_node_file(self, **changes: Unpack[NodeRecord]) -> None:
        self._node_file.update(**changes)

    def _save_cluster_id(self) -> None:
        self._write_node_file(cluster_id=self._sm.state.cluster_id
                              or self._node_file.content.get("cluster_id", ""), joining=False)

    def _wipe(self) -> None:
        """Forgets the metadata of a removed member before it joins again."""
        self.log.info("metadata_wiped", dir=self.dir)
        self._node_file.wipe()


class _Answer:
    """What a Raft callback hands to the thread waiting for it."""

    __slots__ = ("result", "code")

    def __init__(self) -> None:
        self.result: Result | None = None
        self.code: str | None = None
