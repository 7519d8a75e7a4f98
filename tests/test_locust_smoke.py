"""Smoke test of the locust scenarios (``loadtest/locustfile.py``, ``make loadtest``): a
10-second headless run with five users (3 agents, 1 broadcast, 1 request/reply) against a
real node. It checks that every scenario runs and nothing fails — acked sends, offline
replay, competing workers, request/reply — not how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nodeproc import Node

REPO = Path(__file__).resolve().parent.parent

# operations each user class reports (at least one success each)
EXPECTED = {
    "AgentUser": ["mailbox.create", "inbox.send (acked)", "mailbox.query", "agent.offline",
                  "agent.reconnect", "inbox.replay"],
    "BroadcastUser": ["broadcast.publish", "broadcast.task→result"],
    "RequestReplyUser": ["request agents.echo", "request (no responders)"],
}


@pytest.mark.timeout(90)
def test_locust_scenarios_run_without_failures(tmp_path):
    report = tmp_path / "stats.json"
    with Node(tmp_path / "node") as node:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQ9_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"),
               "--headless", "-u", "5", "-r", "5", "-t", "10s", "--only-summary",
               "--host", node.url, "--json-file", str(report.with_suffix(""))]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        out = proc.stdout + proc.stderr
        assert node.running, "the node died during the run\n" + out
    assert proc.returncode == 0, out
    assert '"AgentUser": 3, "BroadcastUser": 1, "RequestReplyUser": 1' in out, out

    stats = {e["name"]: e for e in json.loads(report.read_text())}
    failures = {n: e["num_failures"] for n, e in stats.items() if e["num_failures"]}
    assert not failures, f"failed operations {failures}\n{out}"
    for cls, names in EXPECTED.items():
        for name in names:
            assert name in stats and stats[name]["num_requests"] > 0, \
                f"{cls} recorded no {name!r}\n{out}"
    # the competing workers handled every task once, and the agents' counters add up
    summary = next(line for line in out.splitlines() if "mq9 locust:" in line)
    assert "lost" not in summary and "duplicates" not in summary, summary
    assert stats["broadcast.task→result"]["num_requests"] >= \
        stats["broadcast.publish"]["num_requests"] - 5, out
