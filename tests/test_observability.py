"""What an operator sees: /metrics by kind, /varz and /connz shaped like nats-server's."""

from __future__ import annotations

import asyncio
import json
import re

import nats
from agents import create


async def test_metrics_varz_connz_after_traffic(shared_node):
    nc = await nats.connect(shared_node.url, name="observed-agent")
    try:
        box = await create(nc, ttl=60)
        for _ in range(3):
            await nc.request(f"$mq9.AI.INBOX.{box['mail_id']}.normal", b"x" * 10, timeout=5)
        got = asyncio.Event()

        async def on_msg(msg):
            got.set()

        await nc.subscribe("$mq9.AI.BROADCAST.ops.*", cb=on_msg)
        await nc.flush()
        await nc.flush()
        await nc.publish("$mq9.AI.BROADCAST.ops.ping", b"{}")
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.sleep(1.5)  # gateways fold their counters in once a second

        metrics = shared_node.metrics()

        def value(name: str) -> float:
            m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
            assert m, f"{name} missing from /metrics"
            return float(m.group(1))

        assert value('mq9_messages_in_total{kind="mailbox"}') >= 4  # CREATE + 3 sends
        assert value('mq9_messages_in_total{kind="broadcast"}') >= 1
        assert value('mq9_messages_out_total{kind="broadcast"}') >= 1
        assert value("mq9_send_ack_seconds_count") >= 3
        assert value("mq9_mailboxes") >= 1
        assert value("mq9_stored_messages") >= 3
        for name in ("mq9_rocksdb_bytes", "mq9_connections", "mq9_subscriptions"):
            value(name)
        for line in metrics.splitlines():
            if line.startswith("# HELP mq9_"):
                assert len(line.split(" ", 3)[3]) > 10, line  # every metric says what it is

        status, body = shared_node.http_get("/varz")
        assert status == 200
        varz = json.loads(body)
        assert varz["connections"] >= 1 and varz["in_msgs"] >= 5 and varz["max_payload"] > 0

        status, body = shared_node.http_get("/connz?sort=in_msgs&limit=5")
        assert status == 200
        connz = json.loads(body)
        names = [c["name"] for c in connz["connections"]]
        assert "observed-agent" in names, connz
        mine = connz["connections"][names.index("observed-agent")]
        assert mine["in_msgs"] >= 5 and mine["subscriptions"] >= 1
    finally:
        await nc.close()
