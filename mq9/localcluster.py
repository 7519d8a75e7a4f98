"""``make cluster``: a cluster of three mq9 nodes on this machine, in the foreground.

    python -m mq9.localcluster [--dir ./mq9-cluster] [--nodes 3] [--port 4222]
                               [--metrics-port 9090] [--cluster-port 6222] [mq9 node flags]

Node *i* (n1, n2, ...) listens on 127.0.0.1 only: NATS on ``port + i - 1``, metrics on
``metrics_port + i - 1``, Raft on ``cluster_port + 10 * (i - 1)`` with its data ports right
after it. Its data sits in ``DIR/n<i>``; the cluster secret in ``DIR/cluster-secret``, made
once and kept (the data dirs belong to a cluster sealed with it). n1 founds the cluster, the
others join it, one after the other; a second run restarts the same cluster from its data
dirs. Every node's log lines are printed prefixed with its name. Ctrl-C (or SIGTERM) stops
all of them the way ``mq9 node`` stops on SIGTERM; a second Ctrl-C kills them.
Other flags (``--log-level warning``, ``--max-msgs 100``) go to every node.
"""

from __future__ import annotations

import argparse
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

from mq9 import process

HOST = "127.0.0.1"
# Room between two nodes' Raft ports for the data ports (1 + shards + gateways of them).
CLUSTER_PORT_STRIDE = 10
# Flags this script sets per node; given in the pass-through flags they would clash.
MANAGED = ("--host", "--port", "--metrics-port", "--cluster-port", "--data-dir", "--node-id",
           "--advertise", "--join", "--cluster-secret", "--cluster-secret-file", "--shards",
           "--gateways", "--config")
STOP_TIMEOUT = 60.0


class UsageError(Exception):
    pass


@dataclass
class NodeSpec:
    name: str
    port: int
    metrics_port: int
    cluster_port: int
    data_dir: Path

    def argv(self, cfg: argparse.Namespace, secret_file: Path, seed: NodeSpec | None,
             extra: list[str]) -> list[str]:
        argv = [sys.executable, "-m", "mq9", "node", "--host", HOST, "--advertise", HOST,
                "--node-id", self.name, "--port", str(self.port),
                "--metrics-port", str(self.metrics_port),
                "--cluster-port", str(self.cluster_port), "--data-dir", str(self.data_dir),
                "--cluster-secret-file", str(secret_file),
                "--shards", str(cfg.shards), "--gateways", str(cfg.gateways)]
        if seed is not None:  # ignored by a node whose data dir already holds a member
            argv += ["--join", f"{HOST}:{seed.cluster_port}"]
        return argv + extra


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m mq9.localcluster",
        description="A cluster of mq9 nodes on 127.0.0.1, in the foreground; Ctrl-C stops it. "
                    "Other flags are passed to every `mq9 node`.")
    p.add_argument("--dir", default="mq9-cluster",
                   help="data dirs and the cluster secret (default ./mq9-cluster)")
    p.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    p.add_argument("--port", type=int, default=4222, help="NATS port of n1; n2 the next ...")
    p.add_argument("--metrics-port", type=int, default=9090, help="metrics port of n1, ...")
    p.add_argument("--cluster-port", type=int, default=6222,
                   help=f"Raft port of n1; n2's is {CLUSTER_PORT_STRIDE} higher, ...")
    p.add_argument("--shards", type=int, default=2, help="shard processes per node")
    p.add_argument("--gateways", type=int, default=1, help="gateway processes per node")
    cfg, extra = p.parse_known_args(argv)
    clash = sorted({a.split("=", 1)[0] for a in extra} & set(MANAGED))
    if clash:
        raise UsageError(f"{', '.join(clash)} is set per node by this script; "
                         f"use its own flags (--help)")
    if not 1 <= cfg.nodes <= 9:
        raise UsageError("--nodes must be between 1 and 9")
    if cfg.shards < 1 or cfg.gateways < 1:
        raise UsageError("--shards and --gateways must be at least 1")
    if 1 + cfg.shards + cfg.gateways > CLUSTER_PORT_STRIDE:
        raise UsageError(f"--shards plus --gateways must stay below {CLUSTER_PORT_STRIDE}: "
                         f"each node's data ports sit between its Raft port and the next node's")
    ports = [port for n in layout(cfg) for port in (n.port, n.metrics_port, n.cluster_port)]
    if min(ports) < 1 or max(ports) + cfg.shards + cfg.gateways > 65535:
        raise UsageError("ports out of range")
    data = set()
    for n in layout(cfg):
        data |= set(range(n.cluster_port, n.cluster_port + 1 + cfg.shards + cfg.gateways))
    client = {n.port for n in layout(cfg)} | {n.metrics_port for n in layout(cfg)}
    if len(client) < 2 * cfg.nodes or client & data:
        raise UsageError("the NATS, metrics and cluster port ranges overlap")
    return cfg, extra


def layout(cfg: argparse.Namespace) -> list[NodeSpec]:
    root = Path(cfg.dir)
    return [NodeSpec(f"n{i + 1}", cfg.port + i, cfg.metrics_port + i,
                     cfg.cluster_port + CLUSTER_PORT_STRIDE * i, root / f"n{i + 1}")
            for i in range(cfg.nodes)]


def secret_file(root: Path) -> Path:
    """The cluster secret, made on the first run and read on every later one."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cluster-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def is_member(node: NodeSpec) -> bool:
    return (node.data_dir / "cluster" / "node.json").exists()


def ready(node: NodeSpec) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{node.metrics_port}/readyz", timeout=1) as r:
            status: int = r.status  # urlopen's answer is untyped in typeshed
            return status == 200
    except OSError:
        return False


class Running:
    """One node's ``mq9 node`` process and its output, read line by line."""

    def __init__(self, spec: NodeSpec, argv: list[str], env: dict[str, str]):
        self.spec = spec
        parent = os.getpid()
        # Its own session: Ctrl-C reaches this script only, which stops the nodes in order.
        # The death signal: a killed script does not leave the cluster running.
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: process.die_with_parent(parent, signal.SIGTERM))
        assert self.proc.stdout is not None  # stdout=PIPE
        self.stdout: IO[bytes] = self.proc.stdout
        os.set_blocking(self.stdout.fileno(), False)
        self.partial = b""
        self.ready = False

    def pump(self, out: TextIO) -> bool:
        """Print what the node wrote; False at end of output."""
        try:
            data = os.read(self.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop() if data else b""
        if not data and lines == [b""]:
            lines = []
        for line in lines:
            out.write(f"{self.spec.name} | {line.decode(errors='replace')}\n")
        out.flush()
        return bool(data)


class LocalCluster:
    def __init__(self, cfg: argparse.Namespace, extra: list[str], out: TextIO = sys.stdout):
        self.cfg, self.extra, self.out = cfg, extra, out
        self.specs = layout(cfg)
        self.secret = secret_file(Path(cfg.dir))
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MQ9_CLUSTER_SECRET", "MQ9_CLUSTER_SECRET_FILE")}
        self.nodes: list[Running] = []
        self.sel = selectors.DefaultSelector()
        self.signals: list[int] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def start(self, spec: NodeSpec) -> None:
        seed = self.specs[0] if spec is not self.specs[0] else None
        node = Running(spec, spec.argv(self.cfg, self.secret, seed, self.extra), self.env)
        self.nodes.append(node)
        self.sel.register(node.stdout, selectors.EVENT_READ, node)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            node: Running = key.data
            if not node.pump(self.out):
                self.sel.unregister(key.fileobj)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        todo = list(self.specs)
        announced = False
        status = 0
        while not self.signals:
            # A node joins through n1, so it starts once the nodes before it are ready; a
            # restart of members needs them all up together to have a Raft majority.
            if todo and (all(n.ready for n in self.nodes)
                         or all(is_member(s) for s in todo)):
                self.start(todo.pop(0))
            self.pump(0.2)
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead:
                n = dead[0]
                self.say(f"mq9.localcluster: {n.spec.name} exited with status "
                         f"{n.proc.returncode} (its last lines are above); stopping the others")
                status = 1
                break
            for n in self.nodes:
                if not n.ready:
                    n.ready = ready(n.spec)
            if not todo and not announced and all(n.ready for n in self.nodes):
                self.announce()
                announced = True
        self.stop()
        return status

    def announce(self) -> None:
        path = Path(sys.executable).parent / "mq9"
        mq9 = str(path) if path.exists() else "mq9"
        first = self.specs[0]
        lines = [f"mq9.localcluster: {len(self.specs)} nodes up, one cluster "
                 f"(data and secret in {self.cfg.dir}/):"]
        for s in self.specs:
            lines.append(f"  {s.name}  nats://{HOST}:{s.port}  "
                         f"http://{HOST}:{s.metrics_port}/metrics  raft {HOST}:{s.cluster_port}")
        servers = ",".join(f"nats://{HOST}:{s.port}" for s in self.specs)
        lines += [f"  clients: {servers}",
                  f"  status:  {mq9} cluster status --server {HOST}:{first.cluster_port} "
                  f"--cluster-secret-file {self.secret}",
                  "  Ctrl-C stops every node."]
        self.say("\n".join(lines))

    def stop(self) -> None:
        alive = [n for n in self.nodes if n.proc.poll() is None]
        if alive:
            self.say(f"mq9.localcluster: stopping {', '.join(n.spec.name for n in alive)}")
        for n in alive:
            n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        seen = len(self.signals)
        while any(n.proc.poll() is None for n in self.nodes):
            self.pump(0.2)
            # a second Ctrl-C, or a node that does not drain in time: kill what is left
            if len(self.signals) > seen or time.monotonic() > deadline:
                for n in self.nodes:
                    if n.proc.poll() is None:
                        os.killpg(n.proc.pid, signal.SIGKILL)
                seen = len(self.signals)
        # the rest of their output; a node's children hold the pipe until they are gone too
        deadline = time.monotonic() + 10
        while self.sel.get_map() and time.monotonic() < deadline:
            self.pump(0.2)
        for n in self.nodes:
            n.stdout.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, extra = parse(sys.argv[1:] if argv is None else argv)
        cluster = LocalCluster(cfg, extra)
    except (UsageError, OSError) as e:
        print(f"mq9.localcluster: error: {e}", file=sys.stderr)
        return 2
    return cluster.run()


if __name__ == "__main__":
    sys.exit(main())
