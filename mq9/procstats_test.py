"""Summing /proc over a real process tree."""

from __future__ import annotations

import os
import subprocess
import sys

from mq9 import procstats


def test_usage_sums_the_tree_and_counts_reaped_cpu():
    alone = procstats.usage()
    assert alone.processes >= 1 and alone.rss_bytes > 0 and alone.open_fds >= 3
    # a child that burns some CPU, then sleeps: its RSS and fds join ours while it lives
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "print('busy', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "busy"
        assert child.pid in procstats.tree(os.getpid())
        both = procstats.usage()
        assert both.processes >= alone.processes + 1
        assert both.rss_bytes > alone.rss_bytes
        assert both.cpu_seconds >= alone.cpu_seconds + 0.25
    finally:
        child.kill()
        child.wait()
    after = procstats.usage()
    assert child.pid not in procstats.tree(os.getpid())
    # reaped: its CPU now sits in our cutime, so the total did not fall back
    assert after.cpu_seconds >= both.cpu_seconds - 0.05


def test_cpu_percent_is_of_one_core():
    c = procstats.CpuPercent()
    assert c.sample(10.0, 5.0) == 0.0  # nothing to compare with yet
    assert c.sample(12.0, 8.0) == 150.0
    assert c.sample(13.0, 8.0) == 0.0
