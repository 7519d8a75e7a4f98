"""``mq9 health [--data-dir D]``: is the node running on this data dir healthy?

For container health checks (the image's HEALTHCHECK) and scripts: exit status 0 healthy,
1 not, and one line saying why. The node's ports come from ``run_dir/node.json``, which
its supervisor writes at start, so the check follows ``--metrics-port`` or ``--port``
whichever way they were set (flag, ``MQ9_*`` variable, config file). With the metrics port
on, the node's /healthz decides; with it off (``--metrics-port 0``), the NATS port must
answer with INFO.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request

from mq9 import nodefile

DEFAULT_DATA_DIR = "./mq9-data"


def _local(host: str) -> str:
    """Where to reach a node that listens on ``host`` from the same machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check(data_dir: str, timeout: float) -> tuple[bool, str]:
    run_dir = os.path.join(os.path.abspath(data_dir), "run")
    info = nodefile.read(run_dir)
    if info is None:
        return False, f"no node has started on {data_dir} ({nodefile.path(run_dir)} is missing)"
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False, f"the node (pid {info.pid}) is not running"
    except PermissionError:  # alive, another user's
        pass
    host = _local(info.host)
    if info.metrics_port:
        url = f"http://{host}:{info.metrics_port}/healthz"
        if ":" in host:
            url = f"http://[{host}]:{info.metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return True, f"ok: {url} answered {r.status}"
        except urllib.error.HTTPError as e:
            try:
                why = json.loads(e.read()).get("error") or e.reason
            except (ValueError, AttributeError, OSError):
                why = e.reason
            return False, f"{url} answered {e.code}: {why}"
        except OSError as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                return False, (f"{url} refused the connection: the node is starting (its metrics "
                               "port listens once every gateway accepts clients)")
            return False, f"{url}: {reason}"
    try:
        with socket.create_connection((host, info.port), timeout=timeout) as s:
            s.settimeout(timeout)
            first = s.recv(5)
    except OSError as e:
        return False, f"NATS port {host}:{info.port}: {e.strerror or e}"
    if first != b"INFO ":
        return False, f"NATS port {host}:{info.port} did not send INFO"
    return True, f"ok: NATS port {host}:{info.port} sent INFO"


def main(argv: list[str] | None = None, prog: str = "mq9 health") -> int:
    from mq9.cli import _Parser  # one-line usage errors, like every mq9 command

    p = _Parser(prog=prog, description="Exit 0 if the node running on a data dir is healthy, "
                                       "1 if not, with one line saying why.")
    p.add_argument("--data-dir", default=os.environ.get("MQ9_DATA_DIR") or DEFAULT_DATA_DIR,
                   help=f"the node's data dir [env MQ9_DATA_DIR; default {DEFAULT_DATA_DIR}]")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for an answer")
    ns = p.parse_args(argv)
    ok, line = check(ns.data_dir, ns.timeout)
    if ok:
        print(f"{prog}: {line}")
        return 0
    print(f"{prog}: unhealthy: {line}", file=sys.stderr)
    return 1
