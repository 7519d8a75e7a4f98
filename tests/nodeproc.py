"""A real mq9 node in a subprocess, for end-to-end tests.

    node = Node(tmp_path).start()          # python -m mq9 node on free ports, waits for /readyz
    nc = await nats.connect(node.url)
    ...
    node.kill()                            # kill -9 the supervisor (children follow it)
    node.start()                           # same ports, same data dir: a restart
    node.stop()                            # SIGTERM, returns the exit status

Flags are keyword arguments named like the settings (``max_msgs=5`` -> ``--max-msgs 5``);
a value of None leaves the flag out (so an ``MQ9_*`` variable in ``env`` applies). Defaults:
127.0.0.1, a free NATS port, a free metrics port, data in ``tmp_path/data``, 2 gateways,
2 shards. The node's output (logfmt lines of every process) goes to ``tmp_path/node.log``;
``log_tail()`` gives the end of it for failure messages.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mq9 import procfs
from mq9.procfs import tcp_row  # noqa: F401 - the tests find it here

DEFAULT_READY_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a node or ``mq9`` command under test: this work tree's code
    first on the path (whatever is installed), none of the caller's ``MQ9_*`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQ9_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports nobody listens on right now (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]




class NodeError(AssertionError):
    pass


class Node:
    def __init__(self, tmp_path, *, env: dict[str, str] | None = None,
                 command: list[str] | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 **flags):
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env_overrides = dict(env or {})
        self.command = command or [sys.executable, "-m", "mq9", "node"]
        self.ready_timeout = ready_timeout
        chosen = {}
        if "port" not in flags or "metrics_port" not in flags:
            chosen["port"], chosen["metrics_port"] = free_ports(2)
        self.flags = {"host": "127.0.0.1", "port": chosen.get("port"),
                      "metrics_port": chosen.get("metrics_port"),
                      "data_dir": str(self.dir / "data"), "gateways": 2, "shards": 2,
                      # Single node unless a test asks for a cluster: no Raft or data
                      # ports that parallel test nodes could collide on.
                      "cluster_port": 0}
        self.flags.update(flags)
        self.host = self._setting("host", "0.0.0.0")
        self.port = int(self._setting("port", 4222))
        self.metrics_port = int(self._setting("metrics_port", 9090))
        self.data_dir = self._setting("data_dir", "./mq9-data")
        self.log_path = self.dir / "node.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._seen: dict[int, int] = {}  # every child pid seen -> its start time

    def _setting(self, name: str, default):
        if self.flags.get(name) is not None:
            return self.flags[name]
        return self.env_overrides.get("MQ9_" + name.upper(), default)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def argv(self) -> list[str]:
        args = list(self.command)
        for name, value in self.flags.items():
            if value is None or value is False:
                continue
            flag = "--pass" if name == "password" else "--" + name.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]  # True: a switch (--tls-verify)
        return args

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self, wait: bool = True) -> Node:
        if self.running:
            raise NodeError("node already running")
        env = child_env(self.env_overrides)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"--- start: {' '.join(self.argv())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                     start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float | None = None) -> Node:
        """Until /readyz says every shard and gateway is up (or, without a metrics port,
        until the NATS port sends INFO)."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        last = ""
        while True:
            if not self.running:
                raise NodeError(f"node exited with {self.proc.returncode} before it was ready\n"
                                + self.log_tail())
            if self.metrics_port:
                try:
                    status, body = self.http_get("/readyz", timeout=2)
                    if status == 200:
                        break
                    last = body
                except OSError as e:
                    last = str(e)
            elif self._info_line(timeout=1):
                break
            if time.monotonic() > deadline:
                raise NodeError(f"node not ready after {timeout or self.ready_timeout}s "
                                f"(last answer: {last})\n" + self.log_tail())
            time.sleep(0.05)
        self.pids()
        return self

    def _info_line(self, timeout: float) -> bytes | None:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                data = s.recv(4096)
                return data if data.startswith(b"INFO ") else None
        except OSError:
            return None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the supervisor and wait; returns its exit status. Children it leaves
        behind are killed (and the test should assert on ``survivors()`` before, if it
        cares)."""
        if self.proc is None:
            raise NodeError("node was never started")
        try:
            if self.proc.poll() is None:
                self.pids()
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise NodeError(f"node did not stop within {timeout}s of SIGTERM\n"
                                    + self.log_tail()) from None
            return self.proc.returncode
        finally:
            self._kill_leftovers(grace=2.0)

    def kill(self) -> int:
        """``kill -9`` the supervisor only; its children are expected to follow."""
        if self.proc.poll() is None:
            self.pids()
            self.proc.kill()
        return self.proc.wait()

    def close(self) -> None:
        """Teardown: stop if running, never raise, leave no process behind."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.stop()
                except NodeError:
                    pass
            self._kill_leftovers(grace=0.0)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Node:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- processes ----------------------------------------------------------------------

    def children(self) -> dict[int, str]:
        """The supervisor's live child processes now: pid -> name (``mq9-gateway-0``,
        ``mq9-shard-1``; multiprocessing's resource tracker shows as ``python...``)."""
        found = {}
        if not self.running:
            return found
        for pid, st in procfs.children(self.proc.pid).items():
            found[pid] = st.comm
            self._seen.setdefault(pid, st.starttime)
        return found

    def pids(self, kind: str | None = None) -> list[int]:
        """Live children, all or those of one kind (``gateway``/``shard``). Each pid seen
        here is remembered so ``survivors()`` can find it after the supervisor is gone."""
        prefix = f"mq9-{kind}-" if kind else ""
        return sorted(pid for pid, name in self.children().items() if name.startswith(prefix))

    def pid_of(self, kind: str, index: int) -> int | None:
        for pid, name in self.children().items():
            if name == f"mq9-{kind}-{index}":
                return pid
        return None

    def is_alive(self, pid: int) -> bool:
        """``pid`` is still the process seen earlier (not a reused pid), and not a zombie."""
        st = procfs.stat(pid)
        if st is None or st.state == "Z":
            return False
        return self._seen.get(pid, st.starttime) == st.starttime

    def survivors(self, pids=None) -> list[int]:
        return [p for p in (self._seen if pids is None else pids) if self.is_alive(p)]

    def wait_gone(self, pids=None, timeout: float = 5.0) -> list[int]:
        """Waits until none of ``pids`` (default: every child ever seen) is alive; returns
        those still alive at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.survivors(pids)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def _kill_leftovers(self, grace: float) -> None:
        for pid in self.wait_gone(timeout=grace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---- http and log -------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> str:
        status, body = self.http_get("/metrics")
        if status != 200:
            raise NodeError(f"/metrics answered {status}: {body}")
        return body

    def metric(self, sample: str) -> float | None:
        """The value of one sample of /metrics, e.g. ``mq9_storage_failing`` or
        ``mq9_drops_total{reason="bad_frame"}``; None if it is absent."""
        m = re.search(rf"^{re.escape(sample)} (\S+)$", self.metrics(), re.M)
        return float(m.group(1)) if m else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path}:\n" + "\n".join(tail)

