"""/proc read for real: a process tree summed, a child found, a listening socket and its holder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from mq9 import procfs


def test_usage_sums_the_tree_and_counts_reaped_cpu():
    alone = procfs.usage()
    assert alone.processes >= 1 and alone.rss_bytes > 0 and alone.open_fds >= 3
    # a child that burns some CPU, then sleeps: its RSS and fds join ours while it lives
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "print('busy', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "busy"
        assert child.pid in procfs.tree(os.getpid())
        both = procfs.usage()
        assert both.processes >= alone.processes + 1
        assert both.rss_bytes > alone.rss_bytes
        assert both.cpu_seconds >= alone.cpu_seconds + 0.25
    finally:
        child.kill()
        child.wait()
    after = procfs.usage()
    assert child.pid not in procfs.tree(os.getpid())
    # reaped: its CPU now sits in our cutime, so the total did not fall back
    assert after.cpu_seconds >= both.cpu_seconds - 0.05


def test_cpu_percent_is_of_one_core():
    c = procfs.CpuPercent()
    assert c.sample(10.0, 5.0) == 0.0  # nothing to compare with yet
    assert c.sample(12.0, 8.0) == 150.0
    assert c.sample(13.0, 8.0) == 0.0


def test_stat_and_children_of_a_live_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        st = procfs.stat(child.pid)
        assert st is not None and st.ppid == os.getpid() and st.state != "Z"
        assert child.pid in procfs.children(os.getpid())
        assert procfs.stat(os.getpid()).comm == open("/proc/self/comm").read().strip()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in procfs.children(os.getpid())
    assert procfs.stat(child.pid) is None


def test_listening_socket_and_its_holder():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert procfs.listening_inodes(port) == set()  # bound, not listening
        listener.listen()
        inodes = procfs.listening_inodes(port)
        assert len(inodes) == 1
        assert procfs.holds_socket(os.getpid(), inodes)
        assert not procfs.holds_socket(os.getppid(), inodes)
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            with served:
                row = procfs.tcp_row(port, client.getsockname()[1], procfs.TCP_ESTABLISHED)
                assert row is not None and procfs.holds_socket(os.getpid(), {row.inode})
                assert procfs.tcp_row(port, client.getsockname()[1], procfs.TCP_LISTEN) is None


def test_cpu_and_rss_of_a_process_list():
    me = [os.getpid()]
    with open("/proc/self/status") as f:
        vm_rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    assert abs(procfs.rss_bytes(me) - vm_rss) < 16 * 1024 * 1024  # our heap may move meanwhile
    assert procfs.rss_bytes([2**22 + 1]) == 0  # above any pid_max: never a process
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    assert procfs.cpu_seconds(me) >= 0.15
    assert procfs.cpu_seconds([]) == 0 and procfs.rss_bytes([]) == 0
