"""``make loadtest``: a throwaway mq9 node, locust headless against it, the summary.

    python -m loadtest.run_locust [--gateways N] [--shards N] [LOCUST ARGS...]

Starts ``python -m mq9 node`` on free 127.0.0.1 ports with its data in a temp dir, waits
for ``/readyz``, runs

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --only-summary \\
           --host nats://127.0.0.1:PORT  [LOCUST_ARGS] [LOCUST ARGS...]

(later flags win, so ``make loadtest LOCUST_ARGS="-u 200 -t 2m"`` or
``ARGS="-u 5 -t 10s"`` override the defaults), prints locust's summary and stops the node.
With ``--host`` among the locust arguments no node is started: locust drives that server.
The locust run is bounded: it is killed at its run time plus a minute. Exits with locust's
status (1 when any request failed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
DEFAULTS = ["--headless", "-u", "50", "-r", "10", "-t", "30s", "--only-summary"]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_seconds(args: list[str]) -> float:
    """The last -t/--run-time value in locust's syntax (``90``, ``30s``, ``1h2m3s``)."""
    value = None
    for i, a in enumerate(args):
        if a in ("-t", "--run-time") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--run-time="):
            value = a.split("=", 1)[1]
    if value is None:
        raise SystemExit("run_locust: no -t/--run-time: every load run must be bounded")
    if value.isdigit():
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
    if not parts or not any(parts.groups()):
        raise SystemExit(f"run_locust: can't read run time {value!r}")
    h, m, s = (int(x or 0) for x in parts.groups())
    return h * 3600 + m * 60 + s


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class LocalNode:
    def __init__(self, workdir: Path, gateways: int | None, shards: int | None):
        self.port, self.metrics_port = free_ports(2)
        self.workdir = workdir
        self.log_path = workdir / "node.log"
        self.argv = [sys.executable, "-m", "mq9", "node", "--host", "127.0.0.1",
                     "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                     "--data-dir", str(workdir / "data"), "--cluster-port", "0"]
        if gateways is not None:
            self.argv += ["--gateways", str(gateways)]
        if shards is not None:
            self.argv += ["--shards", str(shards)]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env=child_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of its process group (the supervisor's children)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return ""
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateways", type=int, default=None, help="node gateways (default: CPUs)")
    ap.add_argument("--shards", type=int, default=None, help="node shards (default: 2)")
    opts, extra = ap.parse_known_args(argv)
    locust_args = DEFAULTS + shlex.split(os.environ.get("LOCUST_ARGS", "")) + extra
    own_host = any(a == "--host" or a.startswith("--host=") or a == "-H" for a in locust_args)
    budget = run_seconds(locust_args) + 60

    with tempfile.TemporaryDirectory(prefix="mq9-locust-") as tmp:
        node = None
        try:
            if not own_host:
                node = LocalNode(Path(tmp), opts.gateways, opts.shards)
                node.start()
                locust_args += ["--host", node.url]
                print(f"mq9 node: {node.url} (pid {node.proc.pid}, data in {tmp})", flush=True)
            cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)] + locust_args
            print("command: locust " + " ".join(shlex.quote(a) for a in cmd[3:]), flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env())
            try:
                rc = proc.wait(budget)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"run_locust: locust still running after {budget:.0f}s, killed",
                      file=sys.stderr)
                rc = 124
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                rc = proc.wait(30)
            if node is not None and node.proc.poll() is not None:
                print(f"run_locust: the node died during the run\n{node.log_tail()}",
                      file=sys.stderr)
                rc = rc or 1
            return rc
        finally:
            if node is not None:
                status = node.stop()
                print(f"mq9 node stopped (exit status {status})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
