"""The supervisor of one node (``mq9 node``): spawns shards, then gateways, keeps them
running, stops them in order, and serves the node's /metrics, /healthz and /readyz.

Start-up
    1. lock ``data_dir/supervisor.lock`` (two nodes on one data dir would wipe each other's
       sockets and fight over RocksDB), recreate ``run_dir``, its metrics dir and the ipc
       socket dir, so no stale socket or metric file of a previous run survives;
    2. point ``PROMETHEUS_MULTIPROC_DIR`` there before anything imports
       ``prometheus_client`` here, and before any child is spawned (children inherit it);
    3. check the NATS port is free, bind the metrics port (bound, not yet listening: a port
       conflict fails the start at once, but nothing answers before clients can connect),
       write ``run_dir/node.json`` (pid, ports, the node's one server_id);
    4. spawn the shards and wait until each one's ipc socket file exists (ZeroMQ creates it
       when the shard binds its ROUTER, i.e. when it can take requests); a shard that dies
       or stays silent for ``SHARD_READY_TIMEOUT`` fails the start (exit 1);
    5. spawn the gateways. The node is *ready* (``node_ready`` log line) once every gateway
       holds a listening socket on the NATS port, seen through /proc; only then does the
       metrics port listen, so a tool that waits for /metrics, /varz or /healthz and then
       connects a client is never refused. From then on /healthz and /readyz answer 503
       while a child is down.

Children are spawned (not forked: no inherited event loops, sockets or locks) from the main
thread, which matters for ``PR_SET_PDEATHSIG``: the kernel sends it when the thread that
created the child exits. A child that dies is restarted after a backoff that grows while it
keeps dying young. SIGTERM/SIGINT stop the gateways first (they stop accepting and flush),
then the shards (they finish their batch and close RocksDB), each group within a bounded
time, then SIGKILL; a second signal skips the waiting. SIGHUP reloads the configuration
(``mq9/reload.py``); SIGUSR1 (reopen the log file) is logged and ignored: the node logs to
its standard error, there is no file to reopen. SIGUSR2 is lame-duck mode (nats-server's):
gateways stop accepting and close their clients gradually, then the node stops as on
SIGTERM (which it ignores meanwhile, as nats-server does).

A data dir whose member `mq9 cluster remove` took out starts idle (no children, /readyz
503) unless ``--rejoin``: see ``_stay_removed``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import wait as wait_any

from mq9 import __version__, endpoints, log, nodefile, process, procstats
from mq9 import reload as reloading
from mq9.config import Config
from mq9.protocol import NATS_VERSION
from mq9.wire import NodeInfo

# A shard rebuilds its memory from every key at start: 1M mailboxes over 2 shards took
# 23-50 s on a busy 2-CPU machine (docs/OPERATIONS.md). A shard that dies is seen at once;
# this only catches one that hangs, so it is generous rather than a limit on data size.
SHARD_READY_TIMEOUT = 600.0
# 10 + 10 s stays inside Kubernetes' default 30 s termination grace period.
GATEWAY_STOP_TIMEOUT = 10.0
SHARD_STOP_TIMEOUT = 10.0
RESTART_DELAY_FIRST = 0.2
RESTART_DELAY_MAX = 10.0
STABLE_AFTER = 30.0  # a child that ran this long restarts with the first delay again
# Lame duck: gateways get this long past lame_duck_duration before they are stopped anyway.
LAME_DUCK_MARGIN = 5.0


def _resolve(target: str):
    import importlib

    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _child_main(kind: str, cfg: Config, index: int, target: str | None = None) -> None:
    """Entry point of every spawned child. ``target`` ("module:function") replaces the real
    run function in the supervisor's own tests only."""
    process.die_with_parent()
    process.set_name(f"mq9-{kind}-{index}")
    process.ignore_terminal_interrupt()
    log.setup(cfg.log_level, f"{kind}-{index}", fmt=cfg.log_format)
    try:
        if target is not None:
            run = _resolve(target)
        elif kind == "gateway":
            from mq9.gateway.server import run
        elif kind == "shard":
            from mq9.shard.server import run
        else:
            raise ValueError(f"unknown child kind {kind!r}")
        run(cfg, index)
    except Exception:
        # one logfmt line instead of multiprocessing's multi-line traceback on stderr
        log.exception("child_crashed")
        sys.exit(1)


def _exit_fields(code: int | None) -> dict:
    if code is None:
        return {}
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


class _Child:
    __slots__ = ("kind", "index", "name", "proc", "pid", "started", "failures", "restart_at")

    def __init__(self, kind: str, index: int):
        self.kind = kind
        self.index = index
        self.name = f"{kind}-{index}"
        self.proc = None  # multiprocessing Process, main thread only
        self.pid: int | None = None  # what other threads may look at
        self.started = 0.0
        self.failures = 0  # deaths in a row without a stable run, sets the backoff
        self.restart_at: float | None = None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    # local_address is HEXIP:HEXPORT, state 0A is LISTEN, field 9 the inode
                    if parts[3] == "0A" and int(parts[1].rpartition(":")[2], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _ipc_path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]


class _Supervisor:
    def __init__(self, cfg: Config, targets: dict[str, str] | None, source=None,
                 started: Config | None = None):
        self.cfg = cfg
        # What a reload reads again: the parsed flags and the environment of the start, and
        # the config they gave then (to name the settings a reload cannot change).
        self.source = source
        self.environ = dict(os.environ)
        self.started_cfg = started or cfg
        self.reloads = 0
        self.targets = targets or {}
        self.ctx = multiprocessing.get_context("spawn")
        self.shards = [_Child("shard", i) for i in range(cfg.shards)]
        self.gateways = [_Child("gateway", i) for i in range(cfg.gateway_count)]
        self.children = self.shards + self.gateways
        self.phase = "starting"  # starting | running | stopping
        self.started_wall = time.time()
        self._next_gauges = 0.0
        self.group = None  # mq9.cluster.metadata.MetadataGroup in cluster mode
        self.rebalancer = None  # mq9.cluster.rebalance.Rebalancer, driving mq9.cluster.mover.ShardMover
        self.mover = None
        self.signals: list[int] = []
        self.removed: str | None = None  # why this data dir's member stays out of its cluster
        self.lame_duck_until: float | None = None
        self.stop_signal: str | None = None
        self.hurry = False
        self.ready = False
        self.started_at = time.monotonic()
        self.listening: set[int] = set()  # gateway pids seen listening on the NATS port
        self.metrics = None
        self.lock_fd: int | None = None
        self.http: ThreadingHTTPServer | None = None
        self.serving = False  # the metrics port listens (from node_ready on)
        self.server_id = nodefile.new_server_id()
        self.server_name = cfg.server_name or f"mq9-{socket.gethostname()}"
        self.cpu = procstats.CpuPercent()
        self._next_cpu = 0.0
        self.wake_r: socket.socket | None = None
        self.wake_w: socket.socket | None = None
        self.old_handlers: dict = {}
        self.old_wakeup_fd = -1

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
            try:
                self._bind_http()
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
        cfg = self.cfg
        log.info("node_starting", version=__version__, pid=os.getpid(), host=cfg.host,
                 port=cfg.port, metrics_port=cfg.metrics_port, gateways=len(self.gateways),
                 shards=len(self.shards), data_dir=cfg.data_dir, server_id=self.server_id)

        for c in self.shards:
            self._spawn(c)
        outcome = self._wait_shards_ready()
        if outcome == "ready":
            for c in self.gateways:
                self._spawn(c)
            if self.group is not None:
                self._start_rebalancer()
            self.phase = "running"
            self._loop()
        self._shutdown()
        return 1 if outcome == "failed" else 0

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
            group = from_config(self.cfg, secret=self.cfg.cluster_secret)
            self.group = group.open(join=self.cfg.join, rejoin=self.cfg.rejoin)
        except ClusterError as e:
            if e.code != "removed":
                log.error("cluster_open_failed", join=self.cfg.join, error=str(e))
                return False
            self.removed = str(e)
            return False
        except Exception as e:  # noqa: BLE001 - every failure is fatal here, and said once
            log.error("cluster_open_failed", join=self.cfg.join, error=str(e))
            return False
        self.cfg = dataclasses.replace(self.cfg, node_id=self.group.node_id)
        # `mq9 cluster remove` moved our slots away and took us out: stop as on SIGTERM.
        self.group.on_removed(self._removed_from_cluster)
        snap = self.group.snapshot()
        log.info("cluster_member", node_id=self.group.node_id, leader=self.group.leader(),
                 members=len(snap.members), version=snap.version)
        return True

    def _stay_removed(self) -> int:
        """`mq9 cluster remove` took this member out and it was started again with the
        flags it always had, the way a StatefulSet restarts it. Joining would undo the
        removal (its slots would move back); exiting would have the kubelet restart it
        over and over. So it stays up and idle: no child, no cluster port, /readyz 503
        saying why, /healthz 200, and it exits 0 on SIGTERM (or SIGUSR2)."""
        self.phase = "removed"
        self._serve_http()
        log.warning("cluster_removed_staying_out", error=self.removed,
                    hint="start it with --rejoin (MQ9_REJOIN=1) to join again; "
                         "it does nothing until stopped")
        while self.stop_signal is None:
            self._wait(60.0)
        log.info("node_stopped", signal=self.stop_signal)
        return 0

    def _removed_from_cluster(self) -> None:
        log.info("cluster_removed", node_id=self.cfg.node_id)
        os.kill(os.getpid(), signal.SIGTERM)  # the main loop wakes on its signal fd

    # ---- lame-duck mode ----------------------------------------------------------------

    def _enter_lame_duck(self) -> None:
        """SIGUSR2: every gateway stops accepting and closes its clients gradually (see
        ``Gateway.enter_lame_duck``); gateways that finish exit and are not restarted;
        once none is left the node stops as on SIGTERM. In a cluster the members stop
        advertising this node's client URL."""
        cfg = self.cfg
        self.phase = "lame_duck"
        self.lame_duck_until = time.monotonic() + cfg.lame_duck_duration + LAME_DUCK_MARGIN
        log.info("node_lame_duck", grace_period=cfg.lame_duck_grace_period,
                 duration=cfg.lame_duck_duration)
        for c in self.gateways:
            c.restart_at = None
            if c.proc is not None and c.proc.exitcode is None:
                try:
                    os.kill(c.pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass
        if self.group is not None:
            threading.Thread(target=self._announce_lame_duck, args=(True,),
                             name="mq9-lame-duck", daemon=True).start()

    def _announce_lame_duck(self, on: bool, tries: int = 1) -> None:
        """Sets or clears this member's lame-duck flag in the metadata (other members
        then leave its URL out of connect_urls, or put it back)."""
        for attempt in range(tries):
            try:
                self.group.set_lame_duck(on, timeout=10.0)
                return
            except Exception as e:  # noqa: BLE001 - clients still learn it from our INFO
                error = str(e)
            if self.group is None or attempt == tries - 1:
                break
            time.sleep(5.0)
        log.warning("cluster_lame_duck_write_failed", lame_duck=on, error=error)

    def _lame_duck_over(self) -> bool:
        if all(c.proc is None for c in self.gateways):
            self.stop_signal = "lame_duck"
            return True
        if time.monotonic() >= self.lame_duck_until:
            log.warning("node_lame_duck_timeout", gateways=",".join(
                c.name for c in self.gateways if c.proc is not None))
            self.stop_signal = "lame_duck"
            return True
        return False

    def _start_rebalancer(self) -> None:
        """Every member runs one; only the Raft leader's acts (cluster/rebalance.py)."""
        from mq9.cluster.rebalance import Rebalancer
        from mq9.cluster.mover import ShardMover

        self.mover = ShardMover(self.cfg, self.group)
        self.rebalancer = Rebalancer(self.group, self.mover).start()

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

        self.metrics = metrics
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

    def _bind_http(self) -> None:
        """Binds the metrics port now; ``_serve_http`` listens once the node is ready. A
        bound socket that does not listen refuses connections like a closed port."""
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.metrics.NodeCollector(
            self.started_wall, self.slots_unavailable,
            {"version": __version__, "nats_version": NATS_VERSION}))
        family = socket.getaddrinfo(self.cfg.host, self.cfg.metrics_port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_cls = type("_HttpServer", (ThreadingHTTPServer,),
                          {"address_family": family, "daemon_threads": True})
        self.http = server_cls((self.cfg.host, self.cfg.metrics_port), _make_handler(self, registry),
                               bind_and_activate=False)
        try:
            self.http.server_bind()
        except OSError:
            self.http.server_close()
            self.http = None
            raise

    def _serve_http(self) -> None:
        if self.http is None or self.serving:
            return
        self.http.server_activate()
        self.serving = True
        threading.Thread(target=self.http.serve_forever, name="metrics-http", daemon=True).start()

    def _install_signals(self) -> None:
        # The wakeup fd lets the main loop's wait() return at once on a signal; the Python
        # handler only records it, the loop acts on it.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.old_wakeup_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            self.old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _take_signals(self) -> None:
        if self.wake_r is not None:
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
            if self.phase == "running" and signum == signal.SIGUSR2:
                self._enter_lame_duck()
                continue
            if self.phase == "lame_duck" and signum in (signal.SIGUSR2, signal.SIGTERM):
                # As nats-server: SIGTERM does not cut lame-duck mode short (Kubernetes
                # sends it as soon as the preStop hook that started it returns); the node
                # stops when the period ends. SIGINT still stops it at once.
                log.info("node_lame_duck_signal_ignored", signal=name)
                continue
            if self.stop_signal is None:
                self.stop_signal = name
                log.info("node_stopping", signal=name)
            elif not self.hurry:
                self.hurry = True
                log.warning("node_stop_hurried", signal=name, hint="children are killed now")

    def _reload(self) -> None:
        """SIGHUP: validate everything once, then apply it here and in every child."""
        if self.phase == "stopping" or self.stop_signal is not None:
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
        self.cfg = dataclasses.replace(self.cfg, **reloading.settings(new))
        log.set_level(new.log_level)
        self.reloads += 1
        doc = reloading.Reloaded(generation=self.reloads, **reloading.settings(new))
        try:
            reloading.write(self.cfg.run_dir, doc)
        except OSError as e:
            log.error("reload_failed", error=str(e), hint="children keep their configuration; "
                      "a child restarted from now on starts with the new one")
            return
        told = 0
        for c in self.children:
            if c.pid is not None:
                try:
                    os.kill(c.pid, signal.SIGHUP)
                    told += 1
                except ProcessLookupError:  # died just now: it restarts with self.cfg
                    pass
        log.info("reload_done", generation=self.reloads, changed=",".join(changed) or "none",
                 children=told)

    def _wait(self, timeout: float, children: list[_Child] | None = None) -> None:
        """Until a signal, the death of one of ``children`` (default all), or the timeout."""
        waitables = [c.proc.sentinel for c in (children or self.children) if c.proc is not None]
        waitables.append(self.wake_r)
        wait_any(waitables, max(0.0, timeout))
        self._take_signals()

    def _shard_socket(self, index: int) -> str:
        return _ipc_path(endpoints.shard_endpoint(self.cfg, index))

    def _wait_shards_ready(self) -> str:
        deadline = time.monotonic() + SHARD_READY_TIMEOUT
        pending = list(self.shards)
        while pending:
            if self.stop_signal is not None:
                return "stop"
            for c in list(pending):
                if c.proc is None or c.proc.exitcode is not None:
                    code = c.proc.exitcode if c.proc is not None else None
                    log.error("shard_failed_to_start", child=c.name, **_exit_fields(code))
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
            self._wait(0.02)
        return "ready"

    # ---- running ----------------------------------------------------------------------

    def _spawn(self, c: _Child) -> None:
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

    def _schedule_restart(self, c: _Child, uptime: float) -> float:
        if uptime >= STABLE_AFTER:
            c.failures = 0
        delay = min(RESTART_DELAY_FIRST * 2 ** c.failures, RESTART_DELAY_MAX)
        c.failures += 1
        c.restart_at = time.monotonic() + delay
        return delay

    def _reap(self) -> None:
        for c in self.children:
            p = c.proc
            if p is None or p.exitcode is None:
                continue
            pid, code = p.pid, p.exitcode
            uptime = time.monotonic() - c.started
            p.close()
            c.proc = None
            c.pid = None
            self.listening.discard(pid)
            self._forget_metrics(pid)
            if self.phase == "lame_duck" and c.kind == "gateway":
                log.info("child_stopped", child=c.name, pid=pid, **_exit_fields(code),
                         reason="lame duck")
                continue
            delay = self._schedule_restart(c, uptime)
            log.error("child_died", child=c.name, pid=pid, **_exit_fields(code),
                      uptime=round(uptime, 3), restart_in=round(delay, 3))

    def _forget_metrics(self, pid: int) -> None:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid)
        except OSError as e:
            log.warning("metrics_cleanup_failed", pid=pid, error=str(e))

    def _restart_due(self) -> float | None:
        """Restarts children whose delay has passed; returns the next restart time."""
        now = time.monotonic()
        nxt = None
        for c in self.children:
            if c.restart_at is None:
                continue
            if c.restart_at <= now:
                c.restart_at = None
                if c.kind == "shard":
                    # the dead shard's socket file would make it look ready at once
                    try:
                        os.unlink(self._shard_socket(c.index))
                    except FileNotFoundError:
                        pass
                self.metrics.PROCESS_RESTARTS.labels(c.kind).inc()
                log.info("child_restarting", child=c.name, attempt=c.failures)
                self._spawn(c)
            if c.restart_at is not None:
                nxt = c.restart_at if nxt is None else min(nxt, c.restart_at)
        return nxt

    def _loop(self) -> None:
        while self.stop_signal is None:
            nxt = self._restart_due()
            timeout = 1.0 if self.ready else 0.05
            if nxt is not None:
                timeout = min(timeout, nxt - time.monotonic())
            self._wait(timeout)
            if self.stop_signal is not None:
                break  # children dying now are stopping (Ctrl-C reaches them too), not crashing
            self._reap()
            if self.phase == "lame_duck" and self._lame_duck_over():
                break
            if self.group is not None and time.monotonic() >= self._next_gauges:
                self._next_gauges = time.monotonic() + 1.0
                try:
                    from mq9 import monitor

                    monitor.update_cluster_gauges(self.group)
                except Exception:  # noqa: BLE001 - gauges must never stop the supervisor
                    log.exception("cluster_gauges_failed")
            if not self.ready and not self.not_ready():
                self.ready = True
                self._serve_http()
                log.info("node_ready", port=self.cfg.port, metrics_port=self.cfg.metrics_port,
                         seconds=round(time.monotonic() - self.started_at, 3))
                if self.group is not None and self.group.snapshot().members.get(
                        self.group.node_id, {}).get("lame_duck"):
                    # back from a lame-duck stop (a rolling restart): advertise it again
                    threading.Thread(target=self._announce_lame_duck, args=(False, 6),
                                     name="mq9-lame-duck", daemon=True).start()
            if time.monotonic() >= self._next_cpu:
                self._next_cpu = time.monotonic() + 1.0
                self.cpu.sample(time.monotonic(), procstats.usage(fds=False).cpu_seconds)

    # ---- state for /healthz and /readyz (called from the HTTP thread too) -------------

    def down(self) -> list[str]:
        if self.phase == "removed":
            return []  # alive and meant to be idle: a liveness probe must not restart it
        children = self.shards if self.phase == "lame_duck" else self.children
        return [c.name for c in children if c.pid is None]

    def slots_unavailable(self) -> int:
        """Slots this node owns whose shard process is not running (or not yet taking
        requests after a restart)."""
        down = {c.index for c in self.shards
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

        return sum(1 for shard in SlotMap(len(self.shards)).owners if shard in down)

    def health(self, path: str) -> list[str]:
        """What keeps /healthz (a child down) or /readyz (not every child serving) from
        saying ok; empty when all is well."""
        if self.phase == "stopping":
            return ["node is stopping"]
        if self.phase == "starting":
            return ["node is starting"]
        if self.phase == "removed":  # idle on purpose: alive, never ready
            return [] if path == "/healthz" else [
                "removed from the cluster, staying out until started with --rejoin"]
        if self.phase == "lame_duck" and path == "/readyz":
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
        if self.phase != "running":
            return [self.phase]
        missing = [c.name for c in self.shards
                   if c.pid is None or not os.path.exists(self._shard_socket(c.index))]
        unconfirmed = [c for c in self.gateways if c.pid is None or c.pid not in self.listening]
        if unconfirmed:
            inodes = _listening_inodes(self.cfg.port)
            for c in unconfirmed:
                pid = c.pid
                if pid is not None and inodes and _holds_socket(pid, inodes):
                    self.listening.add(pid)
                else:
                    missing.append(c.name)
        return missing

    # ---- stopping ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.phase = "stopping"
        for c in self.children:
            c.restart_at = None
        self._stop_group(self.gateways, GATEWAY_STOP_TIMEOUT)
        self._stop_group(self.shards, SHARD_STOP_TIMEOUT)
        log.info("node_stopped", signal=self.stop_signal)

    def _stop_group(self, group: list[_Child], timeout: float) -> None:
        running = [c for c in group if c.proc is not None]
        if not running:
            return
        for c in running:
            if c.proc.exitcode is None:
                c.proc.terminate()
        deadline = time.monotonic() + timeout
        while True:
            for c in running:
                if c.proc is not None and c.proc.exitcode is not None:
                    log.info("child_stopped", child=c.name, pid=c.pid, **_exit_fields(c.proc.exitcode))
                    self._release(c)
            left = [c for c in running if c.proc is not None]
            if not left:
                return
            if self.hurry or time.monotonic() >= deadline:
                for c in left:
                    log.warning("child_killed", child=c.name, pid=c.pid,
                                reason="second signal" if self.hurry else "stop timeout")
                    c.proc.kill()
                    c.proc.join(5)
                    self._release(c)
                return
            self._wait(min(0.5, deadline - time.monotonic()), left)

    def _release(self, c: _Child) -> None:
        try:
            c.proc.close()
        except ValueError:  # still running after SIGKILL + 5 s: leave it to the kernel
            pass
        c.proc = None
        c.pid = None

    def close(self) -> None:
        """Last resort on any exit path: no child outlives the supervisor."""
        if self.rebalancer is not None:
            self.rebalancer.stop()
            self.mover.close()
            self.rebalancer = None
        if self.group is not None:
            try:
                self.group.close()
            except Exception:  # noqa: BLE001 - closing must not mask the real exit
                log.exception("cluster_close_failed")
            self.group = None
        for c in self.children:
            if c.proc is not None:
                if c.proc.exitcode is None:
                    c.proc.kill()
                    c.proc.join(5)
                self._release(c)
        if self.http is not None:
            if self.serving:
                self.http.shutdown()  # waits for serve_forever, which must have started
            self.http.server_close()
        if self.wake_w is not None:
            signal.set_wakeup_fd(self.old_wakeup_fd)
            for sig, handler in self.old_handlers.items():
                signal.signal(sig, handler)
            self.wake_r.close()
            self.wake_w.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)


def _make_handler(sup: _Supervisor, registry):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            ctype = "text/plain; charset=utf-8"
            if path == "/metrics":
                try:
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                except Exception:
                    log.exception("metrics_collect_failed")
                    body, code = b"metrics collection failed\n", 500
            elif path in ("/varz", "/connz"):
                from urllib.parse import parse_qsl

                from mq9 import monitor

                query = dict(parse_qsl(self.path.partition("?")[2]))
                if path == "/varz":
                    doc = monitor.varz(sup.cfg, monitor.NodeView(
                        server_id=sup.server_id, server_name=sup.server_name,
                        started=sup.started_wall, usage=procstats.usage(fds=False),
                        cpu_percent=sup.cpu.percent, gateways=len(sup.gateways)))
                else:
                    doc = monitor.connz(sup.cfg, query)
                body, ctype, code = json.dumps(doc, indent=2).encode(), "application/json", 200
            elif path == "/mailboxz":
                from mq9 import mailbox_list

                code, body = mailbox_list.serve(sup.cfg, sup.group, self.path.partition("?")[2])
                ctype = "application/json"
            elif path in ("/healthz", "/readyz"):
                # nats-server's shapes: {"status":"ok"}, or 503 {"status":"unavailable","error":..}
                bad = sup.health(path)
                code = 503 if bad else 200
                doc = {"status": "unavailable", "error": "; ".join(bad)} if bad else {"status": "ok"}
                body, ctype = json.dumps(doc, separators=(",", ":")).encode(), "application/json"
            else:
                body, code = b"not found\n", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            log.debug("http_request", client=self.client_address[0], line=format % args)

    return Handler


def run_node(cfg: Config, targets: dict[str, str] | None = None, args=None) -> int:
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
    sup = _Supervisor(cfg, targets, source=args, started=started)
    try:
        return sup.run()
    except Exception:
        log.exception("supervisor_failed")
        return 1
    finally:
        sup.close()
