"""Smoke test of `make bench`: the quick broadcast workload runs against both servers and
prints a comparison row. It checks that the benchmark works, not how fast anything is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?$")


def _row(out: str, title: str) -> list[str]:
    for line in out.splitlines():
        if line.startswith(title) and "|" in line:
            return [c.strip() for c in line.split("|")]
    raise AssertionError(f"no table row {title!r} in the output:\n{out}")


@pytest.mark.timeout(240)
def test_quick_broadcast_prints_ratio_for_both_servers():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQ9_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", "broadcast"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "command:" in out and "machine:" in out, out
    for title in ("broadcast 1→1", "broadcast 1→5"):
        # workload | metric | nats-server | mq9 | ratio | target | met
        cells = _row(proc.stdout, title)
        assert NUMBER.match(cells[2]), f"no nats-server figure in {cells}\n{out}"
        assert NUMBER.match(cells[3]), f"no mq9 figure in {cells}\n{out}"
        assert re.match(r"^[0-9]+\.[0-9]+ \(mq9/nats\)$", cells[4]), f"no ratio in {cells}\n{out}"
    # nothing of the other workloads ran
    assert "acked send" not in proc.stdout
