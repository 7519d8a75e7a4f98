"""``mq9 mailbox create|delete`` and ``mq9 query``: the mailbox requests of the guide."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from typing import TYPE_CHECKING

from mq9.tools.common import (
    Settings,
    ToolError,
    broker_reply,
    fmt_time,
    out,
    preview,
    print_json,
    request,
    table,
)

if TYPE_CHECKING:
    from nats.aio.client import Client

CREATE = "$mq9.AI.MAILBOX.CREATE"


def _check_mail_id(mail_id: str) -> str:
    if not mail_id or any(c in mail_id for c in " \t\r\n*>"):
        raise ToolError(f"bad mail_id {mail_id!r}")
    if mail_id.startswith("$"):
        raise ToolError(f"give the mail_id, not a subject: {mail_id!r}")
    return mail_id


def _ts(ts: object) -> str:
    """The query's ``ts`` (unix milliseconds; seconds also understood) as local time."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return str(ts or "")
    if ts > 1e11:  # milliseconds: 1e11 s is the year 5138
        ts = ts / 1000
    return fmt_time(ts)


async def create(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    body: dict[str, object] = {}
    if ns.type:
        body["type"] = ns.type
    if ns.ttl is not None:
        body["ttl"] = ns.ttl
    if ns.name:
        body["name"] = ns.name
    msg = await request(nc, CREATE, json.dumps(body).encode(), cfg.timeout)
    data = broker_reply(msg)
    if ns.json:
        print_json(data)
        return 0
    mail_id = data.get("mail_id", "?")
    ttl = data.get("ttl")
    expires = data.get("expires_at")
    if ttl == 0 or not expires:
        life = "never expires" if ttl == 0 else "?"
    else:
        life = f"{ttl}s, expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))}"
    out(f"Created {data.get('type', 'standard')} mailbox")
    for row in table([("  mail_id", str(mail_id)), ("  token", str(data.get("token", "?"))),
                      ("  ttl", life)]):
        out(row)
    out("")
    out("Keep the token: it is needed to query or delete the mailbox.")
    out(f"  send:   mq9 send {mail_id} 'hello'")
    out(f"  read:   mq9 sub '$mq9.AI.INBOX.{mail_id}.*'")
    out(f"  query:  mq9 query {mail_id} --token {data.get('token', 'TOKEN')}")
    return 0


async def delete(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    mail_id = _check_mail_id(ns.mail_id)
    msg = await request(nc, f"$mq9.AI.MAILBOX.DELETE.{mail_id}",
                        json.dumps({"token": ns.token}).encode(), cfg.timeout)
    data = broker_reply(msg)
    if ns.json:
        print_json(data)
    else:
        out(f"Deleted mailbox {mail_id}")
    return 0


async def query(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    mail_id = _check_mail_id(ns.mail_id)
    body: dict[str, object] = {"token": ns.token}
    if ns.limit is not None:
        body["limit"] = ns.limit
    if ns.mark_read:
        body["mark_read"] = True
    msg = await request(nc, f"$mq9.AI.MAILBOX.QUERY.{mail_id}", json.dumps(body).encode(),
                        cfg.timeout)
    data = broker_reply(msg)
    if ns.json:
        print_json(data)
        return 0
    messages = data.get("messages") or []
    unread = data.get("unread", len(messages))
    if ns.mark_read and messages:
        # the reply's count is from after marking; say what was there
        out(f"Mailbox {mail_id}: {len(messages)} message(s) shown and marked read, "
            f"{unread} still unread")
    else:
        out(f"Mailbox {mail_id}: {unread} unread")
    if not messages:
        return 0
    out("")
    rows = [("MSG_ID", "PRIORITY", "TIME", "PAYLOAD")]
    for m in messages:
        payload = m.get("payload", "")
        if m.get("encoding") == "base64":
            payload = f"(binary, base64) {payload}"
        ts = m.get("ts")
        rows.append((str(m.get("msg_id", "")), str(m.get("priority", "")),
                     _ts(ts),
                     payload))
    width = shutil.get_terminal_size((120, 24)).columns
    fixed = sum(max(len(r[i]) for r in rows) for i in range(3)) + 6
    room = max(width - fixed, 20)
    rows = [r[:3] + (preview(r[3], room) if i else r[3],) for i, r in enumerate(rows)]
    for line in table(rows):
        out(line)
    if not ns.mark_read and len(messages) < unread:
        out(f"... {unread - len(messages)} more (raise --limit, or use --json)")
    return 0
