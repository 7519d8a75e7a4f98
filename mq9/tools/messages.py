"""``mq9 send`` (to a mailbox), ``mq9 pub`` (to any subject) and ``mq9 request``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from mq9.tools.common import (
    Progress,
    Settings,
    ToolError,
    body_text,
    broker_reply,
    check_error,
    check_subject,
    out,
    parse_headers,
    print_json,
    read_body,
    request,
    status,
)
from mq9.tools.mailbox import _check_mail_id

if TYPE_CHECKING:
    from nats.aio.client import Client


def _check_size(nc: Client, payload: bytes) -> None:
    limit = getattr(nc, "max_payload", 0) or 0
    if limit and len(payload) > limit:
        raise ToolError(f"message too large: {len(payload)} bytes, the server's max_payload "
                        f"is {limit}")


async def send(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    mail_id = _check_mail_id(ns.mail_id)
    subject = f"$mq9.AI.INBOX.{mail_id}.{ns.priority}"
    payload = read_body(ns.body)
    headers = parse_headers(ns.header)
    _check_size(nc, payload)
    count = ns.count
    progress = Progress("sent", count)
    if ns.ack:
        replies = []
        for i in range(count):
            msg = await request(nc, subject, payload, cfg.timeout, headers=headers)
            replies.append(broker_reply(msg))
            progress.update(i + 1)
        took = progress.finish()
        if ns.json:
            for r in replies:
                out(json.dumps(r))
        elif count == 1:
            r = replies[0]
            out(f"Stored msg_id {r.get('msg_id')} in {r.get('mail_id', mail_id)} "
                f"({r.get('priority', ns.priority)})")
        else:
            out(f"Stored {count} messages in {mail_id} ({ns.priority}), msg_id "
                f"{replies[0].get('msg_id')}..{replies[-1].get('msg_id')}, in {took:.2f}s")
        return 0
    await _publish_many(nc, subject, payload, headers, count, progress)
    took = progress.finish()
    what = "1 message" if count == 1 else f"{count} messages"
    out(f"Sent {what} ({len(payload)} bytes) to {subject}"
        + (f" in {took:.2f}s" if count > 1 else ""))
    status("Not acknowledged: a send to an unknown or expired mailbox is dropped; "
           "use --ack to confirm it was stored.")
    return 0


async def _publish_many(nc: Client, subject: str, payload: bytes, headers: dict[str, str] | None,
                        count: int, progress: Progress) -> None:
    before = getattr(nc, "last_error", None)
    for i in range(count):
        await nc.publish(subject, payload, headers=headers)
        if (i + 1) % 1000 == 0:
            await nc.flush()
        progress.update(i + 1)
    await nc.flush()
    err = getattr(nc, "last_error", None)
    if err is not None and err is not before:
        from mq9.tools.common import describe

        raise ToolError(describe(err))


async def pub(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    subject = check_subject(ns.subject)
    if any(c in subject for c in "*>#"):
        raise ToolError(f"cannot publish to a wildcard subject: {subject}")
    payload = read_body(ns.body)
    headers = parse_headers(ns.header)
    _check_size(nc, payload)
    progress = Progress("published", ns.count)
    await _publish_many(nc, subject, payload, headers, ns.count, progress)
    took = progress.finish()
    what = "1 message" if ns.count == 1 else f"{ns.count} messages"
    out(f"Published {what} ({len(payload)} bytes) to {subject}"
        + (f" in {took:.2f}s" if ns.count > 1 else ""))
    return 0


async def req(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    subject = check_subject(ns.subject)
    payload = read_body(ns.body)
    headers = parse_headers(ns.header)
    _check_size(nc, payload)
    msg = await request(nc, subject, payload, cfg.timeout, headers=headers)
    if subject.startswith("$mq9.AI."):
        try:
            check_error(json.loads(msg.data))
        except (ValueError, UnicodeDecodeError):
            pass
    if ns.raw:
        import sys

        sys.stdout.buffer.write(msg.data + b"\n")
        sys.stdout.flush()
        return 0
    if ns.json:
        try:
            print_json(json.loads(msg.data))
            return 0
        except (ValueError, UnicodeDecodeError):
            pass
    for k, v in (msg.headers or {}).items():
        out(f"{k}: {v}")
    if msg.headers:
        out("")
    out(body_text(msg.data))
    return 0
