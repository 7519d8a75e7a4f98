"""Client commands find the broker through --server, MQ9_SERVER or NATS_URL, in that
order, against a real node; NATS_URL may list several servers, as the nats CLI accepts."""

from __future__ import annotations

import subprocess
import sys

from nodeproc import REPO, child_env, free_port


def mq9(*args: str, env: dict) -> subprocess.CompletedProcess:
    e = child_env()
    e.pop("NATS_URL", None)  # the one of whoever runs the tests must not count
    e.update(env)
    p = subprocess.run([sys.executable, "-m", "mq9", *args], env=e, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_server_precedence_with_a_real_node(shared_node):
    live = f"127.0.0.1:{shared_node.port}"
    dead = f"127.0.0.1:{free_port()}"
    create = ("mailbox", "create", "--ttl", "60", "--timeout", "3")

    # NATS_URL alone, as a list whose first server is down
    p = mq9(*create, env={"NATS_URL": f"nats://{dead}, nats://{live}"})
    assert p.returncode == 0 and p.stdout.strip(), p.stderr

    # MQ9_SERVER wins over NATS_URL: the dead one is used, and named in the error
    p = mq9(*create, env={"MQ9_SERVER": dead, "NATS_URL": live})
    assert p.returncode == 1 and p.stderr.strip() == (
        f"mq9: cannot connect to nats://{dead}: connection refused (is the broker running?)"), p.stderr

    # --server wins over both
    p = mq9(*create, "--server", live, env={"MQ9_SERVER": dead, "NATS_URL": dead})
    assert p.returncode == 0, p.stderr

    # NATS_URL is read only when MQ9_SERVER is unset or empty
    p = mq9(*create, env={"MQ9_SERVER": "", "NATS_URL": dead})
    assert p.returncode == 1 and f"nats://{dead}" in p.stderr, p.stderr
