"""One node (``mq9 node``): brought up, kept in its phases, brought down. Its children are
``mq9/supervisor.py``'s; its monitoring port is ``mq9/monitor_http.py``'s.

Start-up
    1. lock ``data_dir/supervisor.lock`` (two nodes on one data dir would wipe each other's
       sockets and fight over RocksDB), recreate ``run_dir``, its metrics dir and the ipc
       socket dir, so no stale socket or metric file of a previous run survives;
    2. point ``PROMETHEUS_MULTIPROC_DIR`` there before anything imports
       ``prometheus_client`` here, and before any child is spawned (children inherit it);
    3. check the NATS port is free, bind the metrics port (bound, not yet listening: a port
       conflict fails the start at once, but nothing answers before clients can connect),
       write ``run_dir/node.json`` (pid, ports, the node's one server_id);
    4. in cluster mode open the Raft metadata group (join, restart into or bootstrap it);
    5. spawn the shards and wait until each one's ipc socket file exists (ZeroMQ creates it
       when the shard binds its ROUTER, i.e. when it can take requests); a shard that dies
       or stays silent for ``SHARD_READY_TIMEOUT`` fails the start (exit 1);
    6. spawn the gateways. The node is *ready* (``node_ready`` log line) once every gateway
       holds a listening socket on the NATS port, seen through /proc; only then does the
       metrics port listen, so a tool that waits for /metrics, /varz or /healthz and then
       connects a client is never refused. From then on /healthz and /readyz answer 503
       while a child is down.

Phases: starting, running, lame_duck, stopping; or removed. SIGTERM/SIGINT stop the node
(a second signal skips the waiting). SIGHUP reloads the configuration (``mq9/reload.py``);
SIGUSR1 (reopen the log file) is logged and ignored: the node logs to its standard error,
there is no file to reopen. SIGUSR2 is lame-duck mode (nats-server's): gateways stop
accepting and close their clients gradually, then the node stops as on SIGTERM (which it
ignores meanwhile, as nats-server does). A data dir whose member `mq9 cluster remove` took
out starts idle (no children, /readyz 503) unless ``--rejoin``: see ``_stay_removed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from types import FrameType
from typing import TYPE_CHECKING

from mq9 import __version__, endpoints, log, nodefile, procfs
from mq9 import reload as reloading
from mq9.config import Config
from mq9.supervisor import Child, Kind, Supervisor, exit_fields
from mq9.wire import NodeInfo, Reloaded

if TYPE_CHECKING:
    from mq9.cluster.metadata import MetadataGroup
    from mq9.cluster.mover import ShardMover
    from mq9.cluster.rebalance import Rebalancer
    from mq9.monitor_http import MonitorServer

# A shard rebuilds its memory from every key at start: 1M mailboxes over 2 shards took
# 23-50 s on a busy 2-CPU machine (docs/OPERATIONS.md). A shard that dies is seen at once;
# this only catches one that hangs, so it is generous rather than a limit on data size.
SHARD_READY_TIMEOUT = 600.0
# Lame duck: gateways get this long past lame_duck_duration before they are stopped anyway.
LAME_DUCK_MARGIN = 5.0


# What signal.signal returns and takes back: a function, SIG_DFL/SIG_IGN, or None.
SignalHandler = Callable[[int, FrameType | None], object] | int | None


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    LAME_DUCK = "lame_duck"
    STOPPING = "stopping"
    REMOVED = "removed"  # out of its cluster, idle until stopped (``_stay_removed``)


def _ipc_path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]


class Node:
    def __init__(self, cfg: Config, targets: dict[str, str] | None,
                 source: argparse.Namespace | None = None, started: Config | None = None) -> None:
        self.cfg = cfg
        # What a reload reads again: the parsed flags and the environment of the start, and
        # the config they gave then (to name the settings a reload cannot change).
        self.source = source
        self.environ = dict(os.environ)
        self.started_cfg = started or cfg
        self.reloads = 0
        self.phase = Phase.STARTING
        self.started_wall = time.time()
        self._next_gauges = 0.0
        self.group: MetadataGroup | None = None  # in cluster mode
        self.rebalancer: Rebalancer | None = None  # driving self.mover
        self.mover: ShardMover | None = None
        self.signals: list[int] = []
        self.removed: str | None = None  # why this data dir's member stays out of its cluster
        self.lame_duck_until: float | None = None
        self.stop_signal: str | None = None
        self.ready = False
        self.started_at = time.monotonic()
        self.listening: set[int] = set()  # gateway pids seen listening on the NATS port
        self.lock_fd: int | None = None
        self.http: MonitorServer | None = None
        self.server_id = nodefile.new_server_id()
        self.server_name = cfg.server_name or f"mq9-{socket.gethostname()}"
        self.cpu = procfs.CpuPercent()
        self._next_cpu = 0.0
        # A signal makes wake_r readable (the wakeup fd), so a wait returns at once; the
        # Python handler only records it, the main loop acts on it.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.old_handlers: dict[int, SignalHandler] = {}
        self.old_wakeup_fd = -1
        self.sup = Supervisor(cfg, targets, wake=self.wake_r, on_wake=self._take_signals,
                              on_death=self._child_died, before_restart=self._before_restart)

    # ---- start-up ---------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        try:
            if not self._prepare_dirs():
                log.error("data_dir_in_use", data_dir=cfg.data_dir,
                          hint="another mq9 node runs on this data dir")
                return 1
        except OSError as e:
            log.error("data_dir_unusable", data_dir=cfg.data_dir, error=str(e))
            return 1
        self._init_metrics()
        problem = self._port_problem()
        if problem:
            log.error("port_unavailable", host=cfg.host, port=cfg.port, error=problem)
            return 1
        if cfg.metrics_port:
            from mq9.monitor_http import MonitorServer  # after _init_metrics: it imports prometheus_client

            try:
                self.http = MonitorServer(self, cfg.host, cfg.metrics_port)
            except OSError as e:
                log.error("metrics_port_unavailable", host=cfg.host, port=cfg.metrics_port,
                          error=str(e))
                return 1
        self._install_signals()
        # before the cluster opens: `mq9 health` finds an idle removed member through it too
        nodefile.write(cfg.run_dir, NodeInfo(
            pid=os.getpid(), host=cfg.host, port=cfg.port, metrics_port=cfg.metrics_port,
            server_id=self.server_id, server_name=self.server_name, version=__version__,
            started=self.started_wall))
        if self._wants_cluster():
            if not cfg.cluster_secret:
                # Without it Raft would unpickle whatever reaches its port and the data
                # ports would take frames from anyone: refuse rather than run open.
                log.error("cluster_secret_missing",
                          hint="cluster mode (--join, --advertise or a member's data dir) needs "
                               "--cluster-secret, MQ9_CLUSTER_SECRET, cluster_secret in the "
                               "config file or --cluster-secret-file; the same on every member")
                return 1
            if not self._open_cluster():
                return self._stay_removed() if self.removed else 1
        else:
            # No metadata group and no data ports: nothing listens beyond the NATS and
            # metrics ports (pysyncobj unpickles what reaches its port, so it is opt-in).
            self.cfg = dataclasses.replace(self.cfg, cluster_port=0)
        cfg = self.sup.cfg = self.cfg
        log.info("node_starting", version=__version__, pid=os.getpid(), host=cfg.host,
                 port=cfg.port, metrics_port=cfg.metrics_port, gateways=len(self.sup.gateways),
                 shards=len(self.sup.shards), data_dir=cfg.data_dir, server_id=self.server_id)

        for c in self.sup.shards:
            self.sup.spawn(c)
        outcome = self._wait_shards_ready()
        if outcome == "ready":
            for c in self.sup.gateways:
                self.sup.spawn(c)
            if self.group is not None:
                self._start_rebalancer(self.group)
            self.phase = Phase.RUNNING
            self._loop()
        self.phase = Phase.STOPPING
        self.sup.stop()
        log.info("node_stopped", signal=self.stop_signal)
        return 1 if outcome == "failed" else 0

    def _prepare_dirs(self) -> bool:
        cfg = self.cfg
        os.makedirs(cfg.data_dir, exist_ok=True)
        fd = os.open(os.path.join(cfg.data_dir, "supervisor.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for d in dict.fromkeys((cfg.run_dir, endpoints.socket_dir(cfg))):
            try:
                shutil.rmtree(d)
            except FileNotFoundError:
                pass
        # ipc:// sockets carry unauthenticated frames between this node's processes: only
        # this user may reach them (makedirs' mode is filtered by the umask, chmod is not).
        os.makedirs(cfg.run_dir, mode=0o700)
        os.chmod(cfg.run_dir, 0o700)
        os.makedirs(endpoints.metrics_dir(cfg))
        if endpoints.socket_dir(cfg) != cfg.run_dir:
            # in the shared temp dir: made fresh (it was just removed), so nobody else's
            os.makedirs(endpoints.socket_dir(cfg), mode=0o700)
            os.chmod(endpoints.socket_dir(cfg), 0o700)
        return True

    def _init_metrics(self) -> None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = endpoints.metrics_dir(self.cfg)
        early = "prometheus_client" in sys.modules
        from mq9 import metrics  # noqa: E402 - must follow the environment variable

        metrics.zero_known_labels()
        if early:
            # prometheus_client picks single- or multi-process values when first imported
            log.warning("metrics_imported_early",
                        hint="the supervisor's own counters (restarts) are missing from /metrics")

    def _port_problem(self) -> str | None:
        """Gateways bind with SO_REUSEPORT, so a port held by another SO_REUSEPORT
        listener (say, a second node) would be silently shared. Binding without it fails
        whenever anyone listens there."""
        try:
            family, type_, proto, _, addr = socket.getaddrinfo(
                self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, type_, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
        except OSError as e:
            return str(e)
        return None

    def _install_signals(self) -> None:
        self.old_wakeup_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            self.old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _wait_shards_ready(self) -> str:
        deadline = time.monotonic() + SHARD_READY_TIMEOUT
        pending = list(self.sup.shards)
        while pending:
            if self.stop_signal is not None:
                return "stop"
            for c in list(pending):
                if c.proc is None or c.proc.exitcode is not None:
                    code = c.proc.exitcode if c.proc is not None else None
                    log.error("shard_failed_to_start", child=c.name, **exit_fields(code))
                    return "failed"
                if os.path.exists(self._shard_socket(c.index)):
                    log.info("shard_ready", child=c.name, pid=c.pid,
                             seconds=round(time.monotonic() - c.started, 3))
                    pending.remove(c)
            if not pending:
                break
            if time.monotonic() >= deadline:
                log.error("shard_start_timeout", children=",".join(c.name for c in pending),
                          timeout=SHARD_READY_TIMEOUT, socket=self._shard_socket(pending[0].index))
                return "failed"
            self.sup.wait(0.02)
        return "ready"

    def _shard_socket(self, index: int) -> str:
        return _ipc_path(endpoints.shard_endpoint(self.cfg, index))

    # ---- cluster ------------------------------------------------------------------------

    def _wants_cluster(self) -> bool:
        """Cluster mode is asked for with --join (join one), --advertise (be reachable as
        the first member), or by a data dir that already belongs to a cluster (restart)."""
        cfg = self.cfg
        if not cfg.cluster_port:
            return False
        member = os.path.exists(os.path.join(cfg.data_dir, "cluster", "node.json"))
        return bool(cfg.join or cfg.advertise or member)

    def _open_cluster(self) -> bool:
        """Join, restart into or bootstrap the metadata group before any child starts:
        children need this node's id, and gateways the slot map it owns."""
        from mq9.cluster.metadata import ClusterError, from_config

        try:
            group = from_config(self.cfg, secret=self.cfg.cluster_secret).open(
                join=self.cfg.join, rejoin=self.cfg.rejoin)
        except ClusterError as e:
            if e.code != "removed":
                log.error("cluster_open_failed", join=self.cfg.join, error=str(e))
                return False
            self.removed = str(e)
            return False
        except Exception as e:  # noqa: BLE001 - every failure is fatal here, and said once
            log.error("cluster_open_failed", join=self.cfg.join, error=str(e))
            return False
        self.group = group
        self.cfg = dataclasses.replace(self.cfg, node_id=group.node_id)
        # `mq9 cluster remove` moved our slots away and took us out: stop as on SIGTERM.
        group.on_removed(self._removed_from_cluster)
        snap = group.snapshot()
        log.info("cluster_member", node_id=group.node_id, leader=group.leader(),
                 members=len(snap.members), version=snap.version)
        return True

    def _start_rebalancer(self, group: MetadataGroup) -> None:
        """Every member runs one; only the Raft leader's acts (cluster/rebalance.py)."""
        from mq9.cluster.mover import ShardMover
        from mq9.cluster.rebalance import Rebalancer

        self.mover = ShardMover(self.cfg, group)
        self.rebalancer = Rebalancer(group, self.mover).start()

    def _stay_removed(self) -> int:
        """`mq9 cluster remove` took this member out and it was started again with the
        flags it always had, the way a StatefulSet restarts it. Joining would undo the
        removal (its slots would move back); exiting would have the kubelet restart it
        over and over. So it stays up and idle: no child, no cluster port, /readyz 503
        saying why, /healthz 200, and it exits 0 on SIGTERM (or SIGUSR2)."""
        self.phase = Phase.REMOVED
        if self.http is not None:
            self.http.serve()
        log.warning("cluster_removed_staying_out", error=self.removed,
                    hint="start it with --rejoin (MQ9_REJOIN=1) to join again; "
                         "it does nothing until stopped")
        while self.stop_signal is None:
            self.sup.wait(60.0)
        log.info("node_stopped", signal=self.stop_signal)
        return 0

    def _removed_from_cluster(self) -> None:
        log.info("cluster_removed", node_id=self.cfg.node_id)
        os.kill(os.getpid(), signal.SIGTERM)  # the main loop wakes on its signal fd

    # ---- running ----------------------------------------------------------------------

    def _loop(self) -> None:
        while self.stop_signal is None:
            nxt = self.sup.restart_due()
            timeout = 1.0 if self.ready else 0.05
            if nxt is not None:
                timeout = min(timeout, nxt - time.monotonic())
            self.sup.wait(timeout)
            if self.stop_signal is not None:
                break  # children dying now are stopping (Ctrl-C reaches them too), not crashing
            self.sup.reap()
            if self.phase == Phase.LAME_DUCK and self._lame_duck_over():
                break
            group = self.group
            if group is not None and time.monotonic() >= self._next_gauges:
                self._next_gauges = time.monotonic() + 1.0
                try:
                    from mq9 import monitor  # imports prometheus_client: after _init_metrics

                    monitor.update_cluster_gauges(group)
                except Exception:  # noqa: BLE001 - gauges must never stop the supervisor
                    log.exception("cluster_gauges_failed")
            if not self.ready and not self.not_ready():
                self.ready = True
                if self.http is not None:
                    self.http.serve()
                log.info("node_ready", port=self.cfg.port, metrics_port=self.cfg.metrics_port,
                         seconds=round(time.monotonic() - self.started_at, 3))
                me = group.snapshot().members.get(group.node_id) if group is not None else None
                if me is not None and me.get("lame_duck"):
                    # back from a lame-duck stop (a rolling restart): advertise it again
                    threading.Thread(target=self._announce_lame_duck, args=(False, 6),
                                     name="mq9-lame-duck", daemon=True).start()
            if time.monotonic() >= self._next_cpu:
                self._next_cpu = time.monotonic() + 1.0
                self.cpu.sample(time.monotonic(), procfs.usage(fds=False).cpu_seconds)

    def _child_died(self, c: Child, pid: int) -> None:
        self.listening.discard(pid)
        from prometheus_client import multiprocess  # after _init_metrics, as every metrics import

        try:
            # prometheus_client leaves this function unannotated
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        except OSError as e:
            log.warning("metrics_cleanup_failed", pid=pid, error=str(e))

    def _before_restart(self, c: Child) -> None:
        if c.kind == Kind.SHARD:
            # the dead shard's socket file would make it look ready at once
            try:
                os.unlink(self._shard_socket(c.index))
            except FileNotFoundError:
                pass
        from mq9 import metrics  # after _init_metrics, as every metrics import

        metrics.PROCESS_RESTARTS.labels(c.kind).inc()

    # ---- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _take_signals(self) -> None:
        try:
            while self.wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
                continue
            if signum == signal.SIGUSR1:
                log.info("log_reopen_ignored", signal="SIGUSR1",
                         reason="no log file: the node logs to stderr")
                continue
            name = signal.Signals(signum).name
            if self.phase == Phase.RUNNING and signum == signal.SIGUSR2:
                self._enter_lame_duck()
                continue
            if self.phase == Phase.LAME_DUCK and signum in (signal.SIGUSR2, signal.SIGTERM):
                # As nats-server: SIGTERM does not cut lame-duck mode short (Kubernetes
                # sends it as soon as the preStop hook that started it returns); the node
                # stops when the period ends. SIGINT still stops it at once.
                log.info("node_lame_duck_signal_ignored", signal=name)
                continue
            if self.stop_signal is None:
                self.stop_signal = name
                log.info("node_stopping", signal=name)
            elif not self.sup.hurry:
                self.sup.hurry = True
                log.warning("node_stop_hurried", signal=name, hint="children are killed now")

    def _reload(self) -> None:
        """SIGHUP: validate everything once, then apply it here and in every child."""
        if self.phase == Phase.STOPPING or self.stop_signal is not None:
            log.info("reload_ignored", reason="stopping")
            return
        try:
            new = reloading.load(self.source, self.environ, self.cfg)
        except ValueError as e:
            log.error("reload_failed", error=str(e), hint="the running configuration stays")
            return
        fixed = reloading.needs_restart(self.started_cfg, new)
        if fixed:
            log.warning("reload_needs_restart", settings=",".join(fixed),
                        hint="these keep their running values until the node restarts")
        changed = reloading.changed(self.cfg, new)
        self.cfg = self.sup.cfg = dataclasses.replace(self.cfg, **reloading.settings(new))
        log.set_level(new.log_level)
        self.reloads += 1
        doc = Reloaded(generation=self.reloads, **reloading.settings(new))
        try:
            reloading.write(self.cfg.run_dir, doc)
        except OSError as e:
            log.error("reload_failed", error=str(e), hint="children keep their configuration; "
                      "a child restarted from now on starts with the new one")
            return
        told = self.sup.signal(signal.SIGHUP)
        log.info("reload_done", generation=self.reloads, changed=",".join(changed) or "none",
                 children=told)

    # ---- lame-duck mode ----------------------------------------------------------------

    def _enter_lame_duck(self) -> None:
        """SIGUSR2: every gateway stops accepting and closes its clients gradually (see
        ``Gateway.enter_lame_duck``); gateways that finish exit and are not restarted;
        once none is left the node stops as on SIGTERM. In a cluster the members stop
        advertising this node's client URL."""
        cfg = self.cfg
        self.phase = Phase.LAME_DUCK
        self.lame_duck_until = time.monotonic() + cfg.lame_duck_duration + LAME_DUCK_MARGIN
        log.info("node_lame_duck", grace_period=cfg.lame_duck_grace_period,
                 duration=cfg.lame_duck_duration)
        self.sup.retire(self.sup.gateways, signal.SIGUSR2, reason="lame duck")
        if self.group is not None:
            threading.Thread(target=self._announce_lame_duck, args=(True,),
                             name="mq9-lame-duck", daemon=True).start()

    def _announce_lame_duck(self, on: bool, tries: int = 1) -> None:
        """Sets or clears this member's lame-duck flag in the metadata (other members
        then leave its URL out of connect_urls, or put it back)."""
        error = "metadata group closed"
        for attempt in range(tries):
            group = self.group  # None once the node closes it
            if group is None:
                break
            try:
                group.set_lame_duck(on, timeout=10.0)
                return
            except Exception as e:  # noqa: BLE001 - clients still learn it from our INFO
                error = str(e)
            if attempt == tries - 1:
                break
            time.sleep(5.0)
        log.warning("cluster_lame_duck_write_failed", lame_duck=on, error=error)

    def _lame_duck_over(self) -> bool:
        if all(c.proc is None for c in self.sup.gateways):
            self.stop_signal = "lame_duck"
            return True
        if self.lame_duck_until is not None and time.monotonic() >= self.lame_duck_until:
            log.warning("node_lame_duck_timeout", gateways=",".join(
                c.name for c in self.sup.gateways if c.proc is not None))
            self.stop_signal = "lame_duck"
            return True
        return False

    # ---- state for /healthz, /readyz and /metrics (called from the HTTP thread too) -----

    def down(self) -> list[str]:
        if self.phase == Phase.REMOVED:
            return []  # alive and meant to be idle: a liveness probe must not restart it
        children = self.sup.shards if self.phase == Phase.LAME_DUCK else self.sup.children
        return [c.name for c in children if c.pid is None]

    def slots_unavailable(self) -> int:
        """Slots this node owns whose shard process is not running (or not yet taking
        requests after a restart)."""
        down = {c.index for c in self.sup.shards
                if c.pid is None or not os.path.exists(self._shard_socket(c.index))}
        if not down:
            return 0
        group = self.group
        if group is not None:
            try:
                return sum(1 for node, shard in group.snapshot().slots
                           if node == self.cfg.node_id and shard in down)
            except Exception:  # noqa: BLE001 - a scrape must not fail on a group in flux
                log.exception("slots_unavailable_failed")
                return 0
        from mq9.cluster.slots import SlotMap

        return sum(1 for shard in SlotMap(len(self.sup.shards)).owners if shard in down)

    def health(self, path: str) -> list[str]:
        """What keeps /healthz (a child down) or /readyz (not every child serving) from
        saying ok; empty when all is well."""
        if self.phase == Phase.STOPPING:
            return ["node is stopping"]
        if self.phase == Phase.STARTING:
            return ["node is starting"]
        if self.phase == Phase.REMOVED:  # idle on purpose: alive, never ready
            return [] if path == "/healthz" else [
                "removed from the cluster, staying out until started with --rejoin"]
        if self.phase == Phase.LAME_DUCK and path == "/readyz":
            return ["node is in lame duck mode"]
        if path == "/healthz":
            bad = [f"{name} is not running" for name in self.down()]
        else:
            bad = [f"{name} is not serving" for name in self.not_ready()]
        if self.group is not None and not self.group.is_ready():
            bad.append("metadata group replica not caught up")
        if path == "/readyz" and not bad and not self.ready:
            bad = ["node is starting"]  # ready once the main loop has said so in the log
        return bad

    def not_ready(self) -> list[str]:
        if self.phase != Phase.RUNNING:
            return [self.phase.value]
        missing = [c.name for c in self.sup.shards
                   if c.pid is None or not os.path.exists(self._shard_socket(c.index))]
        unconfirmed = [c for c in self.sup.gateways if c.pid is None or c.pid not in self.listening]
        if unconfirmed:
            inodes = procfs.listening_inodes(self.cfg.port)
            for c in unconfirmed:
                pid = c.pid
                if pid is not None and inodes and procfs.holds_socket(pid, inodes):
                    self.listening.add(pid)
                else:
                    missing.append(c.name)
        return missing

    # ---- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Last resort on any exit path: no child outlives the supervisor."""
        if self.rebalancer is not None:
            self.rebalancer.stop()
            self.rebalancer = None
        if self.mover is not None:
            self.mover.close()
            self.mover = None
        if self.group is not None:
            try:
                self.group.close()
            except Exception:  # noqa: BLE001 - closing must not mask the real exit
                log.exception("cluster_close_failed")
            self.group = None
        self.sup.close()
        if self.http is not None:
            self.http.close()
        if self.old_handlers:
            signal.set_wakeup_fd(self.old_wakeup_fd)
            for sig, handler in self.old_handlers.items():
                signal.signal(sig, handler)
        self.wake_r.close()
        self.wake_w.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)


def run_node(cfg: Config, targets: dict[str, str] | None = None,
             args: argparse.Namespace | None = None) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code.

    Must be called from the main thread (signals, and the death signal of the children).
    ``targets`` maps "gateway"/"shard" to "module:function" stand-ins, for tests only.
    ``args``: the parsed flags ``cfg`` came from, read again (with the environment and the
    config file) on SIGHUP; without them a reload re-reads the auth and TLS files only.
    """
    log.setup(cfg.log_level, "supervisor", fmt=cfg.log_format)
    started = cfg
    # Children all see the same numbers even if they computed them on their own: an absolute
    # data dir (independent of cwd) and a fixed gateway count (independent of CPU affinity).
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir),
                              gateways=cfg.gateway_count)
    node = Node(cfg, targets, source=args, started=started)
    try:
        return node.run()
    except Exception:
        log.exception("supervisor_failed")
        return 1
    finally:
        node.close()
