"""The operator's view of mailboxes: /mailboxz on the metrics port and `mq9 mailbox list`,
on real nodes (one node, and a 3-node cluster), with real nats-py clients.

What must hold: counts and bytes per mailbox are right, no token and no payload appears
anywhere, the prefix filter and the cursor work across shards (every mailbox exactly once),
deleted and expired mailboxes are gone, a silent shard makes the page partial instead of
hanging it, and any node of a cluster lists every mailbox of the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

from nodeproc import child_env
from test_cluster import SHARDS, cluster_node, wait_balanced, wait_members

PRIOS = ("urgent", "normal", "notify")


def cli(*args: str, env: dict | None = None, status: int = 0) -> subprocess.CompletedProcess:
    """``mq9 mailbox list ARGS`` as a subprocess; it must exit with ``status``, never with
    a traceback."""
    p = subprocess.run([sys.executable, "-m", "mq9", "mailbox", "list", *args],
                       env=child_env(env), capture_output=True, text=True, timeout=120)
    assert p.returncode == status and "Traceback" not in p.stderr, (args, p.returncode, p.stdout, p.stderr)
    return p


def cli_error(*args: str) -> str:
    """The one stderr line of a list that fails."""
    lines = cli(*args, status=1).stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mq9: "), lines
    return lines[0]


def mailboxz(node, **query) -> dict:
    status, body = node.http_get("/mailboxz?" + urllib.parse.urlencode(query), timeout=30)
    assert status == 200, (status, body)
    return json.loads(body)


def list_all(node, limit: int, prefix: str = "") -> tuple[list[dict], int, list[str]]:
    """Every page, following ``next``: (items, pages, raw bodies)."""
    items, after, pages, bodies = [], "", 0, []
    while True:
        status, body = node.http_get("/mailboxz?" + urllib.parse.urlencode(
            {"prefix": prefix, "after": after, "limit": limit}), timeout=30)
        assert status == 200, body
        bodies.append(body)
        doc = json.loads(body)
        assert not doc["partial"], doc["missing"]
        assert len(doc["mailboxes"]) <= limit
        items += doc["mailboxes"]
        pages += 1
        if doc["next"] is None:
            return items, pages, bodies
        assert doc["next"] > after
        after = doc["next"]


async def create(nc, name: str, ttl: int = 0, type: str = "standard") -> dict:
    r = await nc.request("$mq9.AI.MAILBOX.CREATE",
                         json.dumps({"name": name, "ttl": ttl, "type": type}).encode(), timeout=10)
    box = json.loads(r.data)
    assert "token" in box, box
    return box


async def send(nc, mail_id: str, prio: str, payload: bytes) -> None:
    r = await nc.request(f"$mq9.AI.INBOX.{mail_id}.{prio}", payload, timeout=10)
    assert "msg_id" in json.loads(r.data), r.data


async def test_counts_bytes_prefix_and_no_secrets(node, conns):
    nc = await conns(node.url)
    secret = uuid.uuid4().hex
    boxes = {}
    for name in ("team.alpha.1", "team.alpha.2", "team.beta.1", "solo"):
        boxes[name] = await create(nc, name, ttl=3600 if name == "solo" else 0)
    await create(nc, "last.latest", type="latest")
    payloads = []
    sent = {"urgent": 2, "normal": 3, "notify": 1}
    for prio, n in sent.items():
        for i in range(n):
            p = f"PAYLOAD-{secret}-{prio}-{i}".encode()
            payloads.append(p)
            await send(nc, "team.alpha.1", prio, p)
    await send(nc, "team.beta.1", "notify", b"x" * 1000)
    for p in (b"old-" + secret.encode(), b"new"):
        await send(nc, "last.latest", "normal", p)
    # A query that marks the two urgent ones read: stored still, unread no more.
    r = await nc.request("$mq9.AI.MAILBOX.QUERY.team.alpha.1",
                         json.dumps({"token": boxes["team.alpha.1"]["token"], "limit": 2,
                                     "mark_read": True}).encode(), timeout=10)
    assert len(json.loads(r.data)["messages"]) == 2

    status, body = node.http_get("/mailboxz", timeout=30)
    assert status == 200
    doc = json.loads(body)
    assert doc["total"] == 5 and doc["num_mailboxes"] == 5 and doc["next"] is None
    assert not doc["partial"] and doc["missing"] == []
    by = {m["mail_id"]: m for m in doc["mailboxes"]}
    assert list(by) == sorted(by) == ["last.latest", "solo", "team.alpha.1", "team.alpha.2", "team.beta.1"]
    a1 = by["team.alpha.1"]
    assert a1["unread"] == {"urgent": 0, "normal": 3, "notify": 1}
    assert a1["messages"] == 6 and a1["bytes"] == sum(map(len, payloads))
    assert a1["expires"] is None and a1["ttl_left"] is None and a1["type"] == "standard"
    assert by["team.beta.1"]["unread"] == {"urgent": 0, "normal": 0, "notify": 1}
    assert by["team.beta.1"]["bytes"] == 1000
    assert by["last.latest"]["messages"] == 1 and by["last.latest"]["bytes"] == 3
    assert by["last.latest"]["type"] == "latest"
    assert by["solo"]["ttl"] == 3600 and 3500 < by["solo"]["ttl_left"] <= 3600 and by["solo"]["expires"]
    assert by["team.alpha.2"]["messages"] == 0

    pre = mailboxz(node, prefix="team.alpha.")
    assert [m["mail_id"] for m in pre["mailboxes"]] == ["team.alpha.1", "team.alpha.2"]
    assert pre["total"] is None

    # The CLI: table, JSON, prefix.
    table = cli("--url", node.metrics_url).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["MAIL_ID", "TYPE", "UNREAD", "U/N/N", "MESSAGES", "BYTES", "EXPIRES"]
    row = next(line.split() for line in lines if line.startswith("team.alpha.1 "))
    assert row[:5] == ["team.alpha.1", "standard", "0/3/1", "6", str(sum(map(len, payloads)))]
    assert row[5] == "never"
    assert "5 mailboxes of 5" in table
    js = json.loads(cli("--url", node.metrics_url, "--json").stdout)
    assert [m["mail_id"] for m in js["mailboxes"]] == list(by)
    assert js["mailboxes"][2]["unread"] == a1["unread"] and js["mailboxes"][2]["bytes"] == a1["bytes"]
    env_url = cli("--prefix", "team.", "--all", env={"MQ9_MONITOR_URL": node.metrics_url}).stdout
    assert [line.split()[0] for line in env_url.splitlines()[1:4]] == [
        "team.alpha.1", "team.alpha.2", "team.beta.1"]
    assert "3 mailboxes starting with 'team.'" in env_url

    everything = body + table + env_url + json.dumps(js)
    for box in boxes.values():
        assert box["token"] not in everything
    assert secret not in everything
    for p in payloads:
        assert p.decode() not in everything


async def test_paging_across_shards_every_mailbox_once(node_factory, conns):
    node = node_factory(shards=3)
    nc = await conns(node.url)
    names = sorted(f"agent-{i:02d}.inbox" for i in range(40))
    for n in names:
        await create(nc, n)
    items, pages, _ = list_all(node, limit=7)
    assert [m["mail_id"] for m in items] == names
    assert pages >= 6
    assert {m["shard"] for m in items} == {0, 1, 2}  # pages were merged from every shard
    # With a prefix, across shards too.
    items, _, _ = list_all(node, limit=3, prefix="agent-1")
    assert [m["mail_id"] for m in items] == [n for n in names if n.startswith("agent-1")]
    # The CLI follows the cursor with --all; without it, it says how to go on.
    out = cli("--url", node.metrics_url, "--limit", "7", "--all").stdout
    rows = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("agent-")]
    assert rows == names
    first = cli("--url", node.metrics_url, "--limit", "7").stdout
    assert "more: mq9 mailbox list --after agent-06.inbox" in first
    streamed = json.loads(cli("--url", node.metrics_url, "--limit", "6", "--all", "--json").stdout)
    assert [m["mail_id"] for m in streamed["mailboxes"]] == names
    assert streamed["num_mailboxes"] == 40 and streamed["partial"] is False


async def test_deleted_and_expired_mailboxes_are_gone(node, conns):
    nc = await conns(node.url)
    await create(nc, "stays")
    doomed = await create(nc, "deleted")
    await create(nc, "short", ttl=1)
    assert [m["mail_id"] for m in mailboxz(node)["mailboxes"]] == ["deleted", "short", "stays"]
    r = await nc.request("$mq9.AI.MAILBOX.DELETE.deleted",
                         json.dumps({"token": doomed["token"]}).encode(), timeout=10)
    assert json.loads(r.data)["deleted"] is True
    deadline = time.monotonic() + 20
    while True:
        doc = mailboxz(node)
        if [m["mail_id"] for m in doc["mailboxes"]] == ["stays"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [m["mail_id"] for m in doc["mailboxes"]] == ["stays"] and doc["total"] == 1
    # The list's sockets do not keep the supervisor from stopping cleanly.
    assert node.stop() == 0


async def test_silent_shard_gives_a_partial_page_not_a_hang(node_factory, conns):
    node = node_factory(shards=2)
    nc = await conns(node.url)
    for i in range(10):
        await create(nc, f"box-{i}")
    everyone = mailboxz(node)
    on_shard = {m["mail_id"]: m["shard"] for m in everyone["mailboxes"]}
    assert set(on_shard.values()) == {0, 1}
    pid = node.pid_of("shard", 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        doc = mailboxz(node)
        waited = time.monotonic() - t0
        assert doc["partial"] is True and doc["total"] is None
        assert [(x["node"], x["shard"]) for x in doc["missing"]] == [("mq9", 1)]
        assert "no answer" in doc["missing"][0]["error"]
        assert {m["mail_id"] for m in doc["mailboxes"]} == {k for k, s in on_shard.items() if s == 0}
        assert waited < 25  # bounded by the node's shard timeout, not by the stopped shard
        p = cli("--url", node.metrics_url)
        assert "warning: the list is partial: mq9/shard-1 did not answer" in p.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not mailboxz(node)["partial"]


def test_bad_queries_are_one_line_errors(shared_node):
    for query, word in (("limit=0", "limit"), ("limit=x", "limit"), ("limit=1001", "limit"),
                        ("prefix=a%20b", "prefix"), ("after=%2A", "after")):
        status, body = shared_node.http_get("/mailboxz?" + query)
        assert status == 400, (query, body)
        assert word in json.loads(body)["error"] and body.count("\n") == 1
    assert "'prefix'" in cli_error("--url", shared_node.metrics_url, "--prefix", "a>b")
    assert "cannot reach" in cli_error("--url", "http://127.0.0.1:1")
    assert "has no /mailboxz" in cli_error("--url", shared_node.metrics_url + "/nothing-here")


def test_a_shard_that_cannot_be_dialled_does_not_cut_the_wait_for_the_others(shared_node):
    from mq9 import wire
    from mq9.config import Config
    from mq9.mailbox_list import ask, shards

    cfg = Config(data_dir=str(shared_node.data_dir), shards=2)
    _, targets = shards(cfg, None)
    # A TCP endpoint without the cluster secret cannot even be dialled: it fails at once,
    # and the real shards' answers are still waited for.
    bad = [(("elsewhere", i), f"tcp://127.0.0.1:{i + 1}") for i in range(2)]
    answers, failed = ask(cfg, bad + targets, lambda rid: wire.ListMailboxes(rid), timeout=20)
    assert set(answers) == {("mq9", 0), ("mq9", 1)}
    assert all(type(a) is wire.MailboxList for a in answers.values())
    assert sorted(failed) == [o for o, _ in bad]
    assert all("cannot connect" in why for why in failed.values())


async def test_any_cluster_node_lists_every_mailbox(tmp_path, conns):
    n1 = cluster_node(tmp_path, "c1").start()
    nodes = [n1]
    try:
        nodes.append(cluster_node(tmp_path, "c2", join=n1.flags["cluster_port"]).start())
        nodes.append(cluster_node(tmp_path, "c3", join=n1.flags["cluster_port"]).start())
        wait_members(n1.flags["cluster_port"], 3, timeout=60)
        wait_balanced(n1.flags["cluster_port"], 3, timeout=120)
        time.sleep(0.6)  # gateways re-read the slot map every 200 ms
        names = sorted(f"fleet.{i:02d}" for i in range(30))
        ncs = [await conns(n.url) for n in nodes]
        for i, n in enumerate(names):
            nc = ncs[i % 3]  # created and filled through every node
            await create(nc, n)
            await send(nc, n, PRIOS[i % 3], b"m" * (i + 1))
        for node in nodes:
            doc = mailboxz(node)
            assert doc["total"] == 30 and not doc["partial"], doc["missing"]
            assert [m["mail_id"] for m in doc["mailboxes"]] == names
            assert {m["node"] for m in doc["mailboxes"]} == {"c1", "c2", "c3"}
            assert len({(m["node"], m["shard"]) for m in doc["mailboxes"]}) > SHARDS
            for i, m in enumerate(doc["mailboxes"]):
                assert m["bytes"] == i + 1 and m["messages"] == 1
                assert m["unread"][PRIOS[i % 3]] == 1 and sum(m["unread"].values()) == 1
            items, pages, _ = list_all(node, limit=4)
            assert [m["mail_id"] for m in items] == names and pages >= 8
        out = cli("--url", nodes[2].metrics_url, "--all", "--limit", "5").stdout
        assert [line.split()[0] for line in out.splitlines() if line.startswith("fleet.")] == names
        # A member down: the others still answer, naming its shards as missing.
        on_c3 = {m["mail_id"] for m in mailboxz(n1)["mailboxes"] if m["node"] == "c3"}
        nodes[2].kill()
        doc = mailboxz(n1)
        assert doc["partial"] and doc["total"] is None
        assert sorted((x["node"], x["shard"]) for x in doc["missing"]) == [("c3", i) for i in range(SHARDS)]
        assert [m["mail_id"] for m in doc["mailboxes"]] == [n for n in names if n not in on_c3]
    finally:
        for n in reversed(nodes):
            n.close()
