"""What an agent does with a nats-py connection, shared by the end-to-end tests."""

from __future__ import annotations

import json

T = 5.0  # the longest a single wait may take; failures must not hang the suite


async def create(nc, **body) -> dict:
    """MAILBOX.CREATE as the guide writes it; returns the decoded reply."""
    resp = await nc.request("$mq9.AI.MAILBOX.CREATE", json.dumps(body).encode(), timeout=T)
    reply = json.loads(resp.data)
    assert "error" not in reply, reply
    return reply


async def query(nc, mail_id, token, **extra) -> dict:
    resp = await nc.request(f"$mq9.AI.MAILBOX.QUERY.{mail_id}",
                            json.dumps({"token": token, **extra}).encode(), timeout=T)
    return json.loads(resp.data)
