"""What an agent does with a nats-py connection, shared by the end-to-end tests."""

from __future__ import annotations

import json

import nats

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


async def echo_responder(url: str, subject: str):
    """A connection of its own that answers every request on ``subject`` with ``re:`` and
    the request's body; flushed twice, so its interest has reached every gateway (nats-py
    may write the first flush's PING ahead of the SUB)."""

    nc = await nats.connect(url, allow_reconnect=False)

    async def echo(msg):
        await msg.respond(b"re:" + msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    await nc.flush()
    return nc
