"""Start-up time of a node to its first accepted client (measurement only, not a test).

    python -m loadtest.startup [--data-dir DIR] [--runs N] [--mq9-args FLAGS]

Starts ``python -m mq9 node`` N times on DIR (default: a fresh empty temp dir each run) on
free 127.0.0.1 ports and reports, per run, seconds from the spawn of the process to

- ``first_client``: the first TCP connection to the NATS port that gets INFO,
- ``metrics``: the first connection the metrics port accepts (which must not come before),
- ``node_ready``: the supervisor's own figure from its ``node_ready`` log line,

then stops it with SIGTERM. To measure a data dir with 1M mailboxes, fill one first:
``python -m loadtest.bench --servers mq9 --only mailboxes --workdir W`` leaves it in
``W/mq9-data-1``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _info(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(5) == b"INFO "
    except OSError:
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def one_run(data_dir: Path, extra: list[str], timeout: float) -> dict:
    port, metrics = free_port(), free_port()
    log_path = data_dir.parent / f"{data_dir.name}-startup.log"
    cmd = [sys.executable, "-m", "mq9", "node", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics), "--cluster-port", "0", "--data-dir", str(data_dir),
           *extra]
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    out = {}
    try:
        while "first_client" not in out or "metrics" not in out:
            if proc.poll() is not None:
                raise RuntimeError(f"node exited with {proc.returncode}; see {log_path}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no client accepted in {timeout}s; see {log_path}")
            now = time.monotonic() - t0
            if "metrics" not in out and _accepts(metrics):
                out["metrics"] = now
            if "first_client" not in out and _info(port):
                out["first_client"] = time.monotonic() - t0
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    m = re.search(r"event=node_ready .*seconds=(\S+)", log_path.read_text(errors="replace"))
    out["node_ready"] = float(m.group(1)) if m else float("nan")
    loaded = re.findall(r"event=shard_loaded .*mailboxes=(\d+)", log_path.read_text(errors="replace"))
    out["mailboxes"] = sum(int(n) for n in loaded)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="an existing data dir to start on (default: empty, fresh each run)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--mq9-args", default="", help="more `mq9 node` flags, e.g. '--shards 4'")
    a = p.parse_args(argv)
    rows = []
    for i in range(a.runs):
        tmp = None
        if a.data_dir:
            data = Path(a.data_dir).resolve()
        else:
            tmp = Path(tempfile.mkdtemp(prefix="mq9-startup-"))
            data = tmp / "data"
        try:
            r = one_run(data, shlex.split(a.mq9_args), a.timeout)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        rows.append(r)
        print(f"run {i + 1}: first client {r['first_client']:.2f}s, metrics port {r['metrics']:.2f}s, "
              f"node_ready (supervisor) {r['node_ready']:.2f}s, {r['mailboxes']:,} mailboxes loaded",
              flush=True)
    med = statistics.median(r["first_client"] for r in rows)
    early = [r for r in rows if r["metrics"] < r["first_client"]]
    print(f"median to first accepted client: {med:.2f}s over {len(rows)} runs; "
          f"metrics port before clients: {len(early)} of {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
