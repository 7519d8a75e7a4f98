"""`mq9 bench` (mq9/tools/bench.py) run as a subprocess, with small sizes, against a real
node, a TLS node with a user, and the real nats-server. It checks that the command works and
cleans up after itself, not how fast anything is."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import certs
import natsraw
import pytest
from nodeproc import REPO, Node, child_env, free_port

SMALL = ["--messages", "300", "--mailboxes", "200", "--samples", "30", "--in-flight", "100"]
ROWS = {  # workload -> the tests it reports
    "mailboxes": ("create", "delete"),
    "acked": ("send 64 B, 100 in flight", "send 64 B, 1 in flight"),
    "replay": ("store 64 B, 100 in flight", "deliver 300 stored"),
    "rr": ("request/reply 64 B, 1 in flight",),
}
NUMBER = r"[0-9][0-9,]*(\.[0-9]+)?"


def bench(*args: str, url: str | None = None, timeout: float = 120,
          stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = child_env({"MQ9_SERVER": url} if url else None)
    p = subprocess.run([sys.executable, "-m", "mq9", "bench", *args], env=env, cwd=REPO,
                       stdout=subprocess.PIPE, stderr=stderr, timeout=timeout, check=False)
    p.out, p.err = p.stdout.decode(), (p.stderr or b"").decode()
    assert "Traceback" not in p.err, p.err
    return p


def mailboxes(node: Node) -> float:
    return node.metric("mq9_mailboxes") or 0.0


def wait_mailboxes(node: Node, want: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        got = mailboxes(node)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture(scope="module")
def bench_node(shared_node) -> Node:
    return shared_node


def test_every_workload_has_a_row_with_a_rate_and_nothing_is_left(bench_node):
    before = mailboxes(bench_node)
    p = bench(*SMALL, "--size", "64", url=bench_node.url)
    assert p.returncode == 0, p.out + p.err
    assert p.out.startswith(f"server:  nats://127.0.0.1:{bench_node.port}"), p.out
    for workload, tests in ROWS.items():
        for test in tests:
            m = re.search(rf"^{workload}\s+{re.escape(test)}\s+({NUMBER})\s+({NUMBER})s\s+"
                          rf"({NUMBER}) \S", p.out, re.M)
            assert m, f"no row {workload} / {test}:\n{p.out}"
            ops, rate = m.group(1), m.group(5)
            assert int(ops.replace(",", "")) > 0 and float(rate.replace(",", "")) > 0, m.group(0)
    # the latency rows have percentiles
    assert re.search(rf"^rr .* ({NUMBER}) µs\s+({NUMBER}) µs$", p.out, re.M), p.out
    m = re.search(r"^cleanup: ([0-9,]+) of ([0-9,]+) mailboxes created were deleted$", p.out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(2).replace(",", "")) >= 200, p.out
    assert wait_mailboxes(bench_node, before) == before, "mailboxes left on the node"


def test_json_parses_and_accounts_for_every_mailbox(bench_node):
    before = mailboxes(bench_node)
    p = bench("--server", bench_node.url, *SMALL, "--workload", "acked,replay",
              "--workload", "mailboxes", "--json")
    assert p.returncode == 0, p.out + p.err
    report = json.loads(p.out)
    assert report["plan"]["workloads"] == ["mailboxes", "acked", "replay"]
    got = [(r["workload"], r["name"]) for r in report["results"]]
    assert [w for w, _ in got] == ["mailboxes"] * 2 + ["acked"] * 2 + ["replay"] * 2, got
    for r in report["results"]:
        assert r["operations"] > 0 and r["rate"] > 0 and r["seconds"] > 0, r
    lat = [r for r in report["results"] if r["name"].endswith("1 in flight")]
    assert lat and all(0 < r["p50_us"] <= r["p99_us"] for r in lat), lat
    c = report["cleanup"]
    # 200 by the mailboxes workload, 3 by acked, 1 by replay, 1 to see the server is mq9
    assert c == {"created": 205, "deleted": 205, "left": 0}, c
    assert wait_mailboxes(bench_node, before) == before, "mailboxes left on the node"


def test_progress_bar_on_a_terminal_only(bench_node):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mq9", "bench", "--server", bench_node.url,
                             "--workload", "replay", "--messages", "3000", "--in-flight", "10",
                             # its own deadline, inside pytest's: a stall then says how far
                             # the replay got instead of a bare timeout
                             "--time-limit", "60"],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 90
    # Read as it comes, so a slow run never blocks on a full terminal; stop when the command
    # has exited and its output is read, or say what it had printed when it never ends.
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command exited and everything was read
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
        elif time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mq9 bench did not finish in 90 s; its terminal showed:\n"
                        + b"".join(chunks).decode(errors="replace"))
    os.close(master)
    out = proc.stdout.read().decode()
    proc.wait(60)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out + tty
    assert re.search(r"replay: (store|deliver)\s+\[[#.]{24}\] [0-9,]+/3,000", tty), repr(tty)
    assert "\r" in tty
    # not a terminal: no bar, stderr stays empty
    q = bench("--server", bench_node.url, "--workload", "rr", "--samples", "20")
    assert q.returncode == 0 and q.err == "", q.err


def test_not_an_mq9_server_is_refused():
    server = natsraw.start_nats_server()
    try:
        p = bench("--server", f"nats://127.0.0.1:{server.port}", *SMALL)
    finally:
        server.stop()
    assert p.returncode == 1, p.out + p.err
    assert p.err.strip().splitlines() == [
        f"mq9: nats://127.0.0.1:{server.port} is not an mq9 server: nobody answers "
        "$mq9.AI.MAILBOX.CREATE (a plain NATS server?)"], p.err
    assert p.out == ""


def test_bad_input_is_one_line(bench_node):
    p = bench("--workload", "nope", url=bench_node.url)
    assert p.returncode == 2 and p.err.strip() == (
        "mq9: unknown workload nope; choose from mailboxes, acked, replay, rr"), p.err
    p = bench("--server", "http://127.0.0.1:1")
    assert p.returncode == 1 and p.err.strip() == (
        "mq9: bad server URL 'http://127.0.0.1:1': the scheme must be nats:// or tls://"), p.err
    p = bench("--messages", "0", url=bench_node.url)
    assert p.returncode == 2 and len(p.err.strip().splitlines()) == 1, p.err
    # a refused connection
    p = bench("--server", f"nats://127.0.0.1:{free_port()}")
    assert p.returncode == 1 and p.err.startswith("mq9: cannot connect to "), p.err


def test_tls_and_users(tmp_path):
    ca = certs.CA(tmp_path / "ca")
    server = ca.issue("server", server=True)
    users = tmp_path / "users.toml"
    # the permissions docs/OPERATIONS.md gives for the mailbox workloads
    users.write_text('[[users]]\nuser = "agent"\npassword = "agent-pw"\n'
                     '[users.permissions]\npublish = ["$mq9.AI.>"]\n'
                     'subscribe = ["_INBOX.>", "$mq9.AI.INBOX.>"]\n'
                     '[[users]]\nuser = "admin"\npassword = "admin-pw"\n')
    node = Node(tmp_path / "node", tls_cert=server.cert, tls_key=server.key,
                auth_file=str(users), gateways=1, shards=1)
    url = f"tls://127.0.0.1:{node.port}"
    small = ["--mailboxes", "50", "--messages", "100", "--samples", "20", "--json"]
    with node.start():
        p = bench("--server", url, "--tls-ca", ca.pem, "--user", "agent", "--password",
                  "agent-pw", "--workload", "mailboxes,acked,replay", *small)
        assert p.returncode == 0, p.out + p.err
        report = json.loads(p.out)
        assert report["server"] == url
        assert [r["workload"] for r in report["results"]] == ["mailboxes"] * 2 + [
            "acked"] * 2 + ["replay"] * 2, report["results"]
        assert report["cleanup"]["left"] == 0
        p = bench("--server", f"tls://admin:admin-pw@127.0.0.1:{node.port}", "--tls-ca", ca.pem,
                  "--workload", "rr", *small)
        assert p.returncode == 0, p.out + p.err
        p = bench("--server", url, "--tls-ca", ca.pem, "--user", "agent", "--password",
                  "wrong", *small)
        assert p.returncode == 1 and "authorization violation" in p.err, p.err
        p = bench("--server", url, *small)    # the system CAs do not know this one
        assert p.returncode == 1 and p.err.startswith(f"mq9: cannot connect to {url}: TLS"), p.err


def test_a_failed_workload_is_reported_and_still_cleaned_up(tmp_path):
    node = Node(tmp_path / "node", max_msgs=50, gateways=1, shards=1)
    with node.start():
        p = bench("--server", node.url, "--workload", "acked,rr", "--messages", "200",
                  "--samples", "20", "--json")
        assert p.returncode == 1, p.out + p.err
        report = json.loads(p.out)
        acked, rr = report["results"]
        assert acked["workload"] == "acked" and "max_msgs" in acked["error"], acked
        assert rr["workload"] == "rr" and rr["rate"] > 0, rr     # the others still run
        assert report["cleanup"]["left"] == 0 and report["cleanup"]["created"] >= 2, report
        assert wait_mailboxes(node, 0) == 0, "mailboxes left on the node"
        p = bench("--server", node.url, "--workload", "acked", "--messages", "200")
        assert p.returncode == 1
        assert re.search(r"^acked\s+FAILED", p.out, re.M), p.out
        assert re.search(r"^  acked: warm-up: 50/200 answered, 150 errors, the first: mailbox "
                         r"'\S+' is full .*max_msgs", p.out, re.M), p.out


def test_interrupted_run_still_deletes_its_mailboxes(bench_node):
    before = mailboxes(bench_node)
    proc = subprocess.Popen([sys.executable, "-m", "mq9", "bench", "--server", bench_node.url,
                             "--workload", "mailboxes", "--mailboxes", "200000", "--json"],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while mailboxes(bench_node) < before + 1000 and time.monotonic() < deadline:
            time.sleep(0.05)   # Ctrl-C once it is creating
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 130, (out + err).decode()
    c = json.loads(out)["cleanup"]
    assert c["created"] >= 1000 and c["deleted"] == c["created"] and c["left"] == 0, c
    assert wait_mailboxes(bench_node, before, timeout=30) == before, ("mailboxes left", c, before)
