"""What Linux's /proc says about processes: each one's stat line, a process tree, the
resources a tree uses (CPU, memory, fds), and who holds a listening TCP socket. The node
reads it for readiness and its process metrics; tests and benchmarks read it to find a
node's processes and connections.

Everything is read when asked (a scrape of /metrics or /varz, a readiness check), so nothing
runs in between. CPU time counts the dead too: a process's ``cutime``/``cstime`` hold the
CPU of the children it has reaped, so a gateway that died and was restarted does not take
its CPU seconds with it (``process_cpu_seconds_total`` stays a counter).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"


class Stat(NamedTuple):
    """The fields of /proc/PID/stat that mq9 reads (times in clock ticks, rss in pages)."""

    comm: str
    state: str  # "Z" for a zombie
    ppid: int
    utime: int
    stime: int
    cutime: int  # of the children it has reaped
    cstime: int
    starttime: int  # with the pid, names one process (pids get reused)
    rss: int


def stat(pid: int) -> Stat | None:
    """None once ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # the name is in parentheses and may itself hold spaces and parentheses
    head, _, rest = data.rpartition(")")
    p = rest.split()
    return Stat(head.partition("(")[2], p[0], int(p[1]), int(p[11]), int(p[12]), int(p[13]),
                int(p[14]), int(p[19]), int(p[21]))


def processes() -> dict[int, Stat]:
    """Every process alive now (zombies included)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def children(parent: int) -> dict[int, Stat]:
    """The live (not zombie) children of ``parent``."""
    return {pid: st for pid, st in processes().items() if st.ppid == parent and st.state != "Z"}


def tree(root: int) -> list[int]:
    """``root`` and its descendants alive now."""
    kids: dict[int, list[int]] = {}
    for pid, st in processes().items():
        kids.setdefault(st.ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes themselves (not of children they reaped)."""
    return sum(st.utime + st.stime for pid in pids if (st := stat(pid)) is not None) / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes, exact: /proc/PID/status sums the kernel's per-CPU
    counters, where the stat line's ``rss`` may lag by a few hundred KiB per process."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:  # gone meanwhile
            pass
    return total


@dataclass
class Usage:
    processes: int = 0
    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    open_fds: int = 0


def usage(root: int | None = None, fds: bool = True) -> Usage:
    """What ``root`` (default: this process) and its descendants use, reaped children's CPU
    included. ``fds=False`` skips counting descriptors (a listdir of each process's fd dir,
    long for a gateway holding many connections) when only CPU and memory are wanted."""
    u = Usage()
    for pid in tree(os.getpid() if root is None else root):
        st = stat(pid)
        if st is None:
            continue
        u.processes += 1
        u.cpu_seconds += (st.utime + st.stime + st.cutime + st.cstime) / CLK_TCK
        u.rss_bytes += st.rss * PAGE
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

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None
        self.percent = 0.0

    def sample(self, now: float, cpu_seconds: float) -> float:
        if self.last is not None and now > self.last[0]:
            self.percent = round(100.0 * max(0.0, cpu_seconds - self.last[1]) / (now - self.last[0]), 1)
        self.last = (now, cpu_seconds)
        return self.percent


class TcpRow(NamedTuple):
    """The leading fields of a line of /proc/net/tcp or tcp6, as the kernel writes them
    (hex); positions as in the file, so ``row[9]`` is still the inode."""

    sl: str
    local: str  # HEXIP:HEXPORT
    remote: str
    state: str  # TCP_LISTEN, TCP_ESTABLISHED, ...
    queues: str  # tx_queue:rx_queue
    timer: str
    retransmits: str
    uid: str
    timeout: str
    inode: str


_TCP_FIELDS = len(TcpRow._fields)


def tcp_rows() -> Iterator[TcpRow]:
    """Every socket of /proc/net/tcp and tcp6."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    yield TcpRow(*line.split()[:_TCP_FIELDS])
        except OSError:
            continue


def _port(address: str) -> int:
    return int(address.rpartition(":")[2], 16)


def tcp_row(local_port: int, remote_port: int, state: str | None = None) -> TcpRow | None:
    """The connection local_port <- remote_port, in ``state`` if given."""
    for p in tcp_rows():
        if _port(p.local) == local_port and _port(p.remote) == remote_port and state in (None, p.state):
            return p
    return None


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on ``port`` (several with SO_REUSEPORT)."""
    return {p.inode for p in tcp_rows() if p.state == TCP_LISTEN and _port(p.local) == port}


def holds_socket(pid: int, inodes: set[str]) -> bool:
    """``pid`` has one of these sockets among its file descriptors."""
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
