"""Resource use of one node: its supervisor and every process below it, read from /proc
when asked (a scrape of /metrics or /varz), so nothing runs in between.

CPU time counts the dead too: a process's ``cutime``/``cstime`` hold the CPU of the
children it has reaped, so a gateway that died and was restarted does not take its CPU
seconds with it (``process_cpu_seconds_total`` stays a counter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Usage:
    processes: int = 0
    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    open_fds: int = 0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime,
    [12] stime, [13] cutime, [14] cstime, [21] rss in pages."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rpartition(")")[2].split()  # the name may hold spaces and parentheses


def tree(root: int) -> list[int]:
    """``root`` and its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def usage(root: int | None = None, fds: bool = True) -> Usage:
    """``fds=False`` skips counting descriptors (a listdir of each process's fd dir, long
    for a gateway holding many connections) when only CPU and memory are wanted."""
    u = Usage()
    for pid in tree(os.getpid() if root is None else root):
        st = _stat(pid)
        if st is None:
            continue
        u.processes += 1
        u.cpu_seconds += sum(int(x) for x in st[11:15]) / CLK_TCK
        u.rss_bytes += int(st[21]) * PAGE
        if not fds:
            continue
        try:
            u.open_fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # gone meanwhile, or a zombie
            pass
    return u


class CpuPercent:
    """CPU use as nats-server's /varz "cpu": percent of one core (150.0 = one and a half
    cores busy) over the time between two samples."""

    def __init__(self):
        self.last: tuple[float, float] | None = None
        self.percent = 0.0

    def sample(self, now: float, cpu_seconds: float) -> float:
        if self.last is not None and now > self.last[0]:
            self.percent = round(100.0 * max(0.0, cpu_seconds - self.last[1]) / (now - self.last[0]), 1)
        self.last = (now, cpu_seconds)
        return self.percent
