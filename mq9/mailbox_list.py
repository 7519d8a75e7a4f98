"""The operator's list of mailboxes: ``/mailboxz`` on the metrics port (``mq9 mailbox
list`` reads it).

Served by the supervisor's HTTP thread. One request asks every shard at once, this node's
over ipc and, in a cluster, every member's over TCP (CURVE, ``mq9.shardclient``), for one
sorted page (``wire.ListMailboxes``), then merges the pages into one: the items up to the
lowest point some shard stopped at, sorted by mail_id, at most ``limit``; ``next`` is the
cursor for the following page. So a page costs each shard one bounded piece of work, and
the list scales to any number of mailboxes without holding them all anywhere.

No token and no payload is ever part of it: shards answer with counts and times only
(``wire.MailboxInfo``). A shard that does not answer within ``TIMEOUT`` is named in
``missing`` and the page is ``partial``; the request never waits longer than that.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

import zmq

from mq9 import log, shardclient, subjects, wire
from mq9.cluster.slots import ShardId
from mq9.config import Config
from mq9.monitor import ClusterView, Json, _iso

TIMEOUT = 3.0  # as long as a gateway waits for a shard
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # what one shard gives per request (mailbox.LIST_MAX)

_rids = itertools.count(1)
_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
_ctx_lock = threading.Lock()


class BadQuery(ValueError):
    """A query parameter that cannot be used; the text says which and why."""


def _context() -> zmq.Context[zmq.Socket[bytes]]:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = zmq.Context()
        return _ctx


def parse(query: dict[str, str]) -> tuple[str, str, int]:
    """``?prefix=&after=&limit=`` -> (prefix, after, limit), or BadQuery."""
    prefix = query.get("prefix", "")
    after = query.get("after", "")
    for key, value in (("prefix", prefix), ("after", after)):
        if not subjects.valid_mail_id_part(value):
            raise BadQuery(f"'{key}' must be the start of a mail_id (letters, digits, '_', '-', "
                           f"'.'; at most {subjects.MAX_MAIL_ID}): {value[:40]!r}")
    text = query.get("limit", "")
    if text == "":
        return prefix, after, DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise BadQuery(f"'limit' must be a whole number: {text[:40]!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"'limit' must be between 1 and {MAX_LIMIT}: {limit}")
    return prefix, after, limit


def shards(cfg: Config, group: ClusterView | None) -> tuple[str, list[tuple[ShardId, str]]]:
    """(this node's id, every shard to ask with its endpoint): this node's alone, or every
    member's once the metadata group knows its members."""
    if group is None:
        node = cfg.node_id or "mq9"
        return node, [((node, i), shardclient.endpoint(cfg, node, {}, (node, i)))
                      for i in range(cfg.shards)]
    node = group.node_id
    members = group.snapshot().members
    counts = {member: int(info["shards"]) for member, info in members.items()} or {node: cfg.shards}
    out = []
    for member, n in sorted(counts.items()):
        for i in range(n):
            out.append(((member, i), shardclient.endpoint(cfg, node, members, (member, i))))
    return node, out


def ask(cfg: Config, targets: list[tuple[ShardId, str]], make_op: Callable[[int], wire.ListMailboxes],
        timeout: float = TIMEOUT) -> tuple[dict[ShardId, object], dict[ShardId, str]]:
    """Send ``make_op(rid)`` to every target at once and wait for the answers until
    ``timeout``. -> (answers, {owner: why it has none})."""
    ctx = _context()
    answers: dict[ShardId, object] = {}
    failed: dict[ShardId, str] = {}
    waiting: dict[zmq.Socket[bytes], tuple[ShardId, int]] = {}  # every socket made, to close
    pending = 0  # sockets registered with the poller, not answered yet
    poller = zmq.Poller()
    try:
        for owner, address in targets:
            op = make_op(next(_rids))
            try:
                s = shardclient.dealer(ctx, cfg, address)
            except (zmq.ZMQError, ValueError) as e:
                failed[owner] = f"cannot connect: {e}"
                continue
            waiting[s] = (owner, op.rid)
            try:
                # A peer not connected yet queues the frame; a full queue is as good as silent.
                s.send(wire.encode([op]), zmq.NOBLOCK)
            except zmq.ZMQError as e:
                failed[owner] = f"cannot send: {e}"
                continue
            poller.register(s, zmq.POLLIN)
            pending += 1
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for s, _ in poller.poll(int(left * 1000) + 1):
                owner, rid = waiting[s]
                try:
                    frame = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    m = shardclient.answer_in(frame, rid)
                except Exception as e:  # noqa: BLE001 - an undecodable frame: that shard failed
                    failed[owner] = f"bad answer: {type(e).__name__}"
                else:
                    if m is None:
                        continue  # not the answer to this request
                    answers[owner] = m
                poller.unregister(s)
                pending -= 1
        for owner, _rid in waiting.values():
            if owner not in answers and owner not in failed:
                failed[owner] = f"no answer within {timeout:g}s"
    finally:
        for s in waiting:
            s.close(linger=0)
    return answers, failed


def merge(pages: list[tuple[ShardId, wire.MailboxList]], limit: int,
          ) -> tuple[list[tuple[ShardId, wire.MailboxInfo]], str | None]:
    """One page out of the shards' pages, and the cursor after it (None: nothing after).

    A shard that has more stopped at its ``last``; beyond the lowest such point some shard
    has not looked yet, so only items up to it may go out. A mail_id two shards report (a
    slot half way through a move) goes out once."""
    bound = min((p.last for _, p in pages if p.more and p.last is not None), default=None)
    items = sorted(((i.mail_id, owner, i) for owner, p in pages for i in p.items
                    if bound is None or i.mail_id <= bound), key=lambda t: t[0])
    out: list[tuple[ShardId, wire.MailboxInfo]] = []
    for mail_id, owner, info in items:
        if out and out[-1][1].mail_id == mail_id:
            continue
        if len(out) == limit:
            return out, out[-1][1].mail_id
        out.append((owner, info))
    return out, bound


def page(cfg: Config, group: ClusterView | None, prefix: str = "", after: str = "",
         limit: int = DEFAULT_LIMIT, timeout: float = TIMEOUT) -> Json:
    """The /mailboxz document for one page."""
    node, targets = shards(cfg, group)
    answers, failed = ask(cfg, targets, lambda rid: wire.ListMailboxes(rid, prefix, after, limit),
                          timeout)
    pages = []
    for owner, m in answers.items():
        if type(m) is wire.MailboxList:
            pages.append((owner, m))
        elif type(m) is wire.Result:  # the query was checked here: this is the shard's trouble
            failed[owner] = f"{m.code}: {m.error}"
        else:
            failed[owner] = f"unexpected answer: {type(m).__name__}"
    items, nxt = merge(pages, limit)
    now = time.time()
    total = None
    if not prefix and not failed:
        total = sum(p.total or 0 for _, p in pages)
    return {
        "server_id": node,
        "now": _iso(now),
        "prefix": prefix,
        "after": after,
        "limit": limit,
        "num_mailboxes": len(items),
        "total": total,
        "next": nxt,
        "partial": bool(failed),
        "missing": [{"node": o[0], "shard": o[1], "error": why} for o, why in sorted(failed.items())],
        "mailboxes": [_item(owner, info, now) for owner, info in items],
    }


def _item(owner: ShardId, i: wire.MailboxInfo, now: float) -> Json:
    return {
        "mail_id": i.mail_id,
        "type": i.type,
        "node": owner[0],
        "shard": owner[1],
        "created": _iso(i.created),
        "ttl": i.ttl,
        "expires": _iso(i.expires_at) if i.expires_at else None,
        "ttl_left": max(0, int(i.expires_at - now + 0.999)) if i.expires_at else None,
        "unread": dict(zip(subjects.PRIORITIES, i.unread)),
        "messages": i.messages,
        "bytes": i.bytes,
        "subscribers": i.subscribers,
    }


def serve(cfg: Config, group: ClusterView | None, query_string: str) -> tuple[int, bytes]:
    """(HTTP status, JSON body) for ``GET /mailboxz?query_string``."""
    try:
        prefix, after, limit = parse(dict(parse_qsl(query_string, keep_blank_values=True)))
    except BadQuery as e:
        return 400, json.dumps({"error": str(e)}).encode() + b"\n"
    try:
        doc = page(cfg, group, prefix, after, limit)
    except Exception as e:  # noqa: BLE001 - the HTTP thread must answer, whatever happened
        log.exception("mailbox_list_failed")
        return 500, json.dumps({"error": f"listing failed: {type(e).__name__}: {e}"}).encode() + b"\n"
    return 200, json.dumps(doc, indent=2).encode()
