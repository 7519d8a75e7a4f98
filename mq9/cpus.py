"""How many CPUs this process may use: the smaller of its CPU affinity and its cgroup's
CPU quota (``docker --cpus``, a Kubernetes CPU limit), rounded up, at least 1.

``os.cpu_count()`` counts the host's CPUs, so a node limited to one CPU on a 64-CPU host
would start 64 gateways that fight over that one CPU.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"


def usable(proc_self_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_quota(proc_self_cgroup, root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def cgroup_quota(proc_self_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the tightest quota on this process's cgroup path (None: no quota).

    A limit set on any ancestor applies too, so every level from the process's own cgroup
    up to the root is read; in a container the own cgroup is usually mounted at the root.
    """
    try:
        with open(proc_self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2_path, v1_path = None, None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = (path, controllers)
    found: list[float | None] = []
    if v2_path is not None:
        for d in _levels(root, v2_path):
            found.append(_v2(os.path.join(d, "cpu.max")))
    if v1_path is not None:
        path, controllers = v1_path
        for mount in (os.path.join(root, controllers), os.path.join(root, "cpu,cpuacct"),
                      os.path.join(root, "cpu")):
            if os.path.isdir(mount):
                for d in _levels(mount, path):
                    found.append(_v1(d))
                break
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _levels(mount: str, path: str) -> list[str]:
    """``mount/a/b``, ``mount/a``, ``mount``: the cgroup and its ancestors that exist here."""
    parts = [p for p in path.split("/") if p]
    out = []
    for i in range(len(parts), -1, -1):
        d = os.path.join(mount, *parts[:i])
        if os.path.isdir(d):
            out.append(d)
    return out


def _v2(path: str) -> float | None:
    """cgroup v2 ``cpu.max``: "QUOTA PERIOD" in microseconds, or "max PERIOD"."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    if len(words) != 2:
        return None
    return _ratio(words[0], words[1])


def _v1(d: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``."""
    try:
        with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
            quota = f.read().strip()
        with open(os.path.join(d, "cpu.cfs_period_us")) as f:
            period = f.read().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p
