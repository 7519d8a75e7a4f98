"""The `mq9` client commands (mq9/tools), run as real subprocesses against a real node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid

from nodeproc import REPO, child_env, free_port


def mq9(*args: str, url: str | None = None, input: bytes | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    env = child_env({"MQ9_SERVER": url} if url else None)
    p = subprocess.run([sys.executable, "-m", "mq9", *args], input=input, env=env, cwd=REPO,
                       capture_output=True, timeout=timeout, check=False)
    p.out, p.err = p.stdout.decode(), p.stderr.decode()
    assert "Traceback" not in p.err, p.err
    return p


def ok(*args, **kw) -> subprocess.CompletedProcess:
    p = mq9(*args, **kw)
    assert p.returncode == 0, (args, p.returncode, p.out, p.err)
    return p


def fails(*args, **kw) -> str:
    """The one stderr line of a command that must fail with status 1."""
    p = mq9(*args, **kw)
    assert p.returncode == 1, (args, p.returncode, p.out, p.err)
    lines = p.err.strip().splitlines()
    assert lines and lines[-1].startswith("mq9: "), p.err
    return lines[-1]


class Sub:
    """`mq9 sub` in the background; ready once it says it is listening."""

    def __init__(self, url: str, *args: str):
        self.p = subprocess.Popen([sys.executable, "-m", "mq9", "sub", *args],
                                  env=child_env({"MQ9_SERVER": url}), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.p.stderr.readline().decode()
        assert line.startswith("Listening on"), line + self.p.stderr.read().decode()

    def feed_until_done(self, send, timeout: float = 15) -> tuple[int, str, str]:
        """Call ``send()`` until the subscriber exits: its SUB reaches the node's other
        gateway a moment after it is acknowledged, and a monitor sees live traffic only."""
        deadline = time.monotonic() + timeout
        while self.p.poll() is None and time.monotonic() < deadline:
            send()
            try:
                self.p.wait(0.3)
            except subprocess.TimeoutExpired:
                pass
        if self.p.poll() is None:
            self.p.kill()
        out, err = self.p.communicate()
        assert b"Traceback" not in err, err.decode()
        return self.p.returncode, out.decode(), err.decode()


def create(url: str, **kw) -> tuple[str, str]:
    args = ["mailbox", "create"]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    p = ok(*args, url=url)
    mail_id = re.search(r"mail_id\s+(\S+)", p.out).group(1)
    token = re.search(r"token\s+(tok-\S+)", p.out).group(1)
    return mail_id, token


def test_help_lists_every_command():
    p = ok("--help")
    for cmd in ("node", "cluster", "mailbox", "send", "pub", "sub", "query", "request"):
        assert re.search(rf"^\s+{cmd}\s", p.out, re.MULTILINE), (cmd, p.out)
    assert "--server" in ok("send", "--help").out


def test_mailbox_send_query_sub_delete(shared_node):
    url = shared_node.url
    mail_id, token = create(url, ttl=600)
    assert mail_id.startswith("m-")

    p = ok("send", mail_id, "--ack", "--header", "X-Trace: abc", '{"task": "hello"}', url=url)
    assert re.search(rf"msg_id 1 in {mail_id} \(normal\)", p.out), p.out
    p = ok("send", mail_id, "--ack", "--priority", "urgent", "stop now", url=url)
    assert "msg_id 2" in p.out

    p = ok("query", mail_id, "--token", token, url=url)
    assert f"{mail_id}: 2 unread" in p.out
    rows = [line.split() for line in p.out.splitlines() if re.match(r"^\d+\s", line)]
    assert [(r[0], r[1]) for r in rows] == [("2", "urgent"), ("1", "normal")], p.out
    assert '{"task": "hello"}' in p.out

    # the owner subscription replays: urgent first, with the broker's headers and ours
    p = ok("sub", f"$mq9.AI.INBOX.{mail_id}.*", "--count", "2", "--timeout", "10", url=url)
    first, second = p.out.split("[#2]")
    assert f"$mq9.AI.INBOX.{mail_id}.urgent" in first and "msg_id=2 priority=urgent" in first
    assert "stop now" in first
    assert f"$mq9.AI.INBOX.{mail_id}.normal" in second and "msg_id=1 priority=normal" in second
    assert "X-Trace: abc" in second
    assert '"task": "hello"' in second and '{"task"' not in second  # pretty-printed JSON

    # --json is one object per line, with the headers
    ok("send", mail_id, "--ack", "again", url=url)
    p = ok("sub", f"$mq9.AI.INBOX.{mail_id}.normal", "--count", "1", "--json", "--timeout", "10",
           url=url)
    rec = json.loads(p.out)
    assert rec["data"] == "again" and rec["headers"]["Mq9-Msg-Id"] == "3"

    p = ok("query", mail_id, "--token", token, url=url)
    assert f"{mail_id}: 0 unread" in p.out

    assert "Deleted mailbox" in ok("mailbox", "delete", mail_id, "--token", token, url=url).out
    err = fails("query", mail_id, "--token", token, url=url)
    assert err.startswith("mq9: not_found: "), err


def test_stdin_body_query_json_and_mark_read(shared_node):
    url = shared_node.url
    name = f"cli-{uuid.uuid4().hex[:8]}"
    p = ok("mailbox", "create", "--name", name, "--type", "latest", "--json", url=url)
    reply = json.loads(p.out)
    assert reply["mail_id"] == name and reply["type"] == "latest"
    token = reply["token"]
    p = ok("send", name, "--ack", "--json", "-", url=url, input=b'{"from": "stdin"}')
    assert json.loads(p.out)["mail_id"] == name

    p = ok("query", name, "--token", token, "--json", url=url)
    reply = json.loads(p.out)
    assert reply["unread"] == 1 and reply["messages"][0]["payload"] == '{"from": "stdin"}'
    ok("query", name, "--token", token, "--mark-read", url=url)
    assert json.loads(ok("query", name, "--token", token, "--json", url=url).out)["unread"] == 0

    assert fails("query", name, "--token", "tok-wrong", url=url).startswith("mq9: auth: ")
    assert fails("mailbox", "create", "--name", name, url=url).startswith("mq9: exists: ")


def test_monitor_sees_traffic(shared_node):
    url = shared_node.url
    mail_id, _ = create(url)
    sub = Sub(url, "$mq9.AI.#", "--count", "1", "--json", "--timeout", "15")
    rc, out, err = sub.feed_until_done(
        lambda: ok("send", mail_id, "--ack", "watched", url=url))
    assert rc == 0, err
    rec = json.loads(out)
    assert rec["subject"] == f"$mq9.AI.INBOX.{mail_id}.normal" and rec["data"] == "watched"


def test_prefix_wildcard_monitor(shared_node):
    url = shared_node.url
    name = f"m-status-{uuid.uuid4().hex[:8]}"
    ok("mailbox", "create", "--name", name, "--type", "latest", url=url)
    sub = Sub(url, "$mq9.AI.INBOX.m-status-*.normal", "--count", "1", "--raw", "--timeout", "15")
    rc, out, err = sub.feed_until_done(
        lambda: ok("send", name, "--ack", '{"load": 0.7}', url=url))
    assert rc == 0, err
    assert out == '{"load": 0.7}\n'


def test_broadcast_pub_sub_and_request(shared_node):
    url = shared_node.url
    sub = Sub(url, "$mq9.AI.BROADCAST.pipeline.*", "--count", "1", "--timeout", "15")
    rc, out, err = sub.feed_until_done(
        lambda: ok("pub", "$mq9.AI.BROADCAST.pipeline.complete", '{"ok": true}', url=url))
    assert rc == 0, err
    assert "$mq9.AI.BROADCAST.pipeline.complete" in out and '"ok": true' in out

    p = ok("request", "$mq9.AI.MAILBOX.CREATE", '{"ttl": 60}', "--json", url=url)
    assert json.loads(p.out)["ttl"] == 60
    assert fails("request", "nobody.listens.here", "x", url=url) == \
        "mq9: no responders for nobody.listens.here"


def test_errors_are_one_line(shared_node):
    url = shared_node.url
    mail_id, _ = create(url)
    # a bad priority: refused by the CLI (usage error) and, sent raw, by the broker
    p = mq9("send", mail_id, "--priority", "high", "x", url=url)
    assert p.returncode == 2 and "invalid choice: 'high'" in p.err
    err = fails("request", f"$mq9.AI.INBOX.{mail_id}.high", "x", url=url)
    assert err.startswith("mq9: bad_request: "), err
    assert fails("send", "m-nobody", "--ack", "x", url=url).startswith("mq9: not_found: ")
    err = fails("sub", "nothing.comes", "--count", "1", "--timeout", "1", url=url)
    assert err == "mq9: timeout: received 0 of 1 message(s) on nothing.comes within 1s"
    assert fails("sub", "two words", url=url).startswith("mq9: bad subject")


def test_connection_refused():
    port = free_port()
    for args in (["mailbox", "create"], ["sub", "x"], ["send", "m-x", "y"]):
        p = mq9(*args, "--server", f"nats://127.0.0.1:{port}", timeout=15)
        assert p.returncode == 1
        assert p.err.startswith(f"mq9: cannot connect to nats://127.0.0.1:{port}: "), p.err
        assert len(p.err.strip().splitlines()) == 1, p.err


def test_server_auth_flags(node_factory):
    n = node_factory(auth_token="s3cret")
    err = fails("mailbox", "create", "--server", n.url)
    assert err.startswith(f"mq9: cannot connect to {n.url}: authorization violation"), err
    p = ok("mailbox", "create", "--server", n.url, "--auth-token", "s3cret", "--json")
    assert json.loads(p.out)["mail_id"].startswith("m-")
