"""``mq9 sub SUBJECT``: print messages as they arrive.

mq9 accepts two subject forms nats-py refuses before sending the SUB: a trailing ``#``
(``$mq9.AI.#``, the guide's ``nats sub '$mq9.AI.#'``) and a prefix wildcard token
(``$mq9.AI.INBOX.m-status-*.normal``). The connection for ``sub`` is made with nats-py's
``skip_subject_validation`` (2.x); on an older nats-py without it, the check is bypassed
for this one SUB. The subject is still checked here for emptiness and whitespace, which is
what keeps protocol injection out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from mq9.tools.common import Settings, ToolError, body_text, check_subject, out, status

if TYPE_CHECKING:
    import argparse

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription


def _subscribe_unchecked(nc: Client, subject: str, **kw: Any) -> Awaitable[Subscription]:
    if getattr(nc, "_skip_subject_validation", False):
        return nc.subscribe(subject, **kw)
    from nats.aio import client

    async def go() -> Subscription:
        saved = getattr(client, "_validate_subject", None)
        if saved is None:
            return await nc.subscribe(subject, **kw)
        client._validate_subject = lambda *a, **k: None
        try:
            return await nc.subscribe(subject, **kw)
        finally:
            client._validate_subject = saved
    return go()


def _json_line(msg: Msg, n: int, now: float) -> str:
    rec: dict[str, object] = {"n": n, "time": now, "subject": msg.subject}
    if msg.reply:
        rec["reply"] = msg.reply
    if msg.headers:
        rec["headers"] = dict(msg.headers)
    try:
        rec["data"] = msg.data.decode()
    except UnicodeDecodeError:
        rec["data"] = base64.b64encode(msg.data).decode()
        rec["encoding"] = "base64"
    return json.dumps(rec, ensure_ascii=False)


def _readable(msg: Msg, n: int, now: float) -> str:
    stamp = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int((now % 1) * 1000):03d}"
    lines = [f"[#{n}] {stamp} {msg.subject}"]
    headers = dict(msg.headers or {})
    mid, prio = headers.pop("Mq9-Msg-Id", None), headers.pop("Mq9-Priority", None)
    tags = []
    if mid is not None:
        tags.append(f"msg_id={mid}")
    if prio is not None:
        tags.append(f"priority={prio}")
    if msg.reply:
        tags.append(f"reply={msg.reply}")
    if tags:
        lines[0] += "  " + " ".join(tags)
    for k, v in headers.items():
        lines.append(f"{k}: {v}")
    lines.append(body_text(msg.data))
    return "\n".join(lines) + "\n"


def _check_open(nc: Client, subject: str) -> None:
    """The server closes the connection after some -ERRs (nats-py does, on any -ERR that
    is not a permissions error); say why instead of waiting forever."""
    if nc.is_closed:
        err = getattr(nc, "last_error", None)
        from mq9.tools.common import describe

        reason = describe(err) if err is not None else "connection closed"
        raise ToolError(f"subscription to {subject} ended: {reason}")


async def sub(nc: Client, ns: argparse.Namespace, cfg: Settings) -> int:
    subject = check_subject(ns.subject)
    if ns.queue is not None:
        check_subject(ns.queue, "queue group")
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def cb(msg: Msg) -> None:
        queue.put_nowait(msg)

    kw: dict[str, Any] = {"cb": cb}
    if ns.queue:
        kw["queue"] = ns.queue
    if ns.count:
        # The server stops after N: an owner subscription then marks no more messages
        # delivered than were printed here.
        kw["max_msgs"] = ns.count
    await _subscribe_unchecked(nc, subject, **kw)
    with contextlib.suppress(Exception):  # a refused SUB closes the connection: said below
        # nats-py annotates the timeout as int; it goes to asyncio.wait_for, seconds as a float
        await nc.flush(timeout=cfg.timeout)  # type: ignore[arg-type]
    _check_open(nc, subject)
    # on stderr, also with --raw/--json: stdout stays only messages
    what = f"{ns.count} message(s)" if ns.count else "messages"
    group = f" in queue group {ns.queue}" if ns.queue else ""
    until = f", for {cfg.timeout:g}s" if cfg.timeout_given else ", Ctrl-C to stop"
    status(f"Listening on {subject}{group} for {what}{until}")

    deadline = time.monotonic() + cfg.timeout if cfg.timeout_given else None
    n = 0
    while not ns.count or n < ns.count:
        wait = 0.5 if deadline is None else min(deadline - time.monotonic(), 0.5)
        if wait <= 0:
            break
        try:
            msg = await asyncio.wait_for(queue.get(), wait)
        except TimeoutError:
            _check_open(nc, subject)
            continue
        n += 1
        now = time.time()
        if ns.raw:
            sys.stdout.buffer.write(msg.data + b"\n")
            sys.stdout.flush()
        elif ns.json:
            out(_json_line(msg, n, now))
        else:
            out(_readable(msg, n, now))
    if ns.count and n < ns.count:
        raise ToolError(f"timeout: received {n} of {ns.count} message(s) on {subject} "
                        f"within {cfg.timeout:g}s")
    return 0
