"""The child-process helpers, in plain Python children: a child dies at once when its
parent is already gone, and keeps running (with its name set) while the parent lives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mq9

# the children import this tree's mq9, whatever is installed
ENV = {**os.environ, "PYTHONPATH": str(Path(mq9.__file__).resolve().parent.parent)}


def test_die_with_parent_exits_at_once_when_the_parent_is_already_gone():
    code = ("from mq9 import process; process.die_with_parent(parent_pid=1); "
            "print('still here')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=ENV, timeout=30)
    assert r.returncode == 1 and "still here" not in r.stdout


def test_die_with_parent_keeps_a_child_whose_parent_lives():
    code = ("import os; from mq9 import process; process.die_with_parent(parent_pid=os.getppid()); "
            "process.set_name('mq9-test-name'); print(open('/proc/self/comm').read().strip())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=ENV, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mq9-test-name"
