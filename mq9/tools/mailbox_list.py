"""``mq9 mailbox list``: the operator's list of mailboxes, read from a node's ``/mailboxz``
(its metrics port), not over NATS: it needs no mailbox token and shows none, nor any message.

A table by default (mail_id, type, unread urgent/normal/notify, stored messages, bytes,
expiry), one page at a time; ``--all`` follows the cursor to the end, printing each page as
it comes, so even a very long list never sits in memory. ``--json`` prints the node's page
document, or with ``--all`` one document whose ``mailboxes`` array is written as the pages
arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

from mq9.tools.common import ToolError, fmt_time, out, status

DEFAULT_URL = "http://127.0.0.1:9090"
HTTP_TIMEOUT = 15.0  # the node gives up on a silent shard after 3 s
ALL_PAGE = 1000  # --all without --limit: the largest page, fewest round trips


# A /mailboxz page or one of its entries, as decoded JSON (``mq9/mailbox_list.py`` writes it).
Doc = dict[str, Any]


def base_url(ns: argparse.Namespace) -> str:
    url = (ns.url or os.environ.get("MQ9_MONITOR_URL") or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ToolError(f"--url must be the node's monitoring URL (http://HOST:PORT): {url!r}")
    return url


def fetch(url: str, prefix: str, after: str, limit: int | None, timeout: float) -> Doc:
    query = {"prefix": prefix, "after": after}
    if limit is not None:
        query["limit"] = str(limit)
    full = f"{url}/mailboxz?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(full, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        detail = _error_text(e.read())
        if e.code == 404:
            raise ToolError(f"{url} has no /mailboxz (is it an mq9 node's metrics port?)") from None
        raise ToolError(detail or f"{url}: HTTP {e.code}") from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise ToolError(f"cannot reach {url}: {reason} (is the node running with its "
                        f"--metrics-port there?)") from None
    except (TimeoutError, OSError) as e:
        raise ToolError(f"cannot reach {url}: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise ToolError(f"{url}/mailboxz did not answer JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("mailboxes"), list):
        raise ToolError(f"{url}/mailboxz: unexpected answer")
    return doc


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return ""


def _expires(m: Doc) -> str:
    left = m.get("ttl_left")
    if left is None:
        return "never"
    try:
        at = datetime.fromisoformat(str(m.get("expires")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return f"in {_span(left)}"
    return f"{fmt_time(at)[:19]} (in {_span(left)})"


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(m: Doc) -> tuple[str, ...]:
    u = m.get("unread") or {}
    return (str(m.get("mail_id", "")), str(m.get("type", "")),
            f"{u.get('urgent', 0)}/{u.get('normal', 0)}/{u.get('notify', 0)}",
            str(m.get("messages", 0)), str(m.get("bytes", 0)), _expires(m))


HEADER = ("MAIL_ID", "TYPE", "UNREAD U/N/N", "MESSAGES", "BYTES", "EXPIRES")


def _warn_partial(doc: Doc, warned: set[str]) -> None:
    for miss in doc.get("missing") or ():
        where = f"{miss.get('node')}/shard-{miss.get('shard')}"
        if where not in warned:
            warned.add(where)
            status(f"mq9: warning: the list is partial: {where} did not answer "
                   f"({miss.get('error')})")


def main(ns: argparse.Namespace) -> int:
    """``run`` with its expected failures as one line on stderr and exit status 1."""
    try:
        return run(ns)
    except ToolError as e:
        status(f"mq9: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mq9 mailbox list --all | head`
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0


def run(ns: argparse.Namespace) -> int:
    url = base_url(ns)
    timeout = ns.timeout or HTTP_TIMEOUT
    if ns.all and ns.limit is None:
        ns.limit = ALL_PAGE
    prefix, after = ns.prefix or "", ns.after or ""
    warned: set[str] = set()
    doc = fetch(url, prefix, after, ns.limit, timeout)
    if ns.json and not ns.all:
        out(json.dumps(doc, indent=2, ensure_ascii=False))
        _warn_partial(doc, warned)
        return 0
    if ns.json:
        return _all_json(url, ns, doc, timeout, warned)
    total = doc.get("total")
    shown = 0
    first = True
    while True:
        rows = [_row(m) for m in doc["mailboxes"]]
        if first:
            # Column widths from the first page; later pages follow them as best they can.
            widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
            out(_line(HEADER, widths))
            first = False
        for r in rows:
            out(_line(r, widths))
        shown += len(rows)
        _warn_partial(doc, warned)
        nxt = doc.get("next")
        if not ns.all or not nxt:
            break
        if nxt <= after:
            raise ToolError(f"the node's cursor does not advance ({nxt!r} after {after!r})")
        after = nxt
        doc = fetch(url, prefix, after, ns.limit, timeout)
    summary = f"{shown} mailbox{'es' if shown != 1 else ''}"
    if total is not None and not ns.after:
        summary += f" of {total}"
    if prefix:
        summary += f" starting with {prefix!r}"
    out("")
    out(summary)
    nxt = doc.get("next")
    if nxt and not ns.all:
        more = f"mq9 mailbox list --after {nxt}"
        if prefix:
            more += f" --prefix {prefix}"
        out(f"more: {more}   (or --all)")
    return 0


def _line(row: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()


def _all_json(url: str, ns: argparse.Namespace, doc: Doc, timeout: float, warned: set[str]) -> int:
    """One JSON document, its ``mailboxes`` written page by page."""
    prefix, after = ns.prefix or "", ns.after or ""
    missing: dict[str, Doc] = {}
    n = 0
    w = sys.stdout.write
    w('{"mailboxes": [')
    while True:
        for m in doc["mailboxes"]:
            w(("," if n else "") + "\n  " + json.dumps(m, ensure_ascii=False))
            n += 1
        for miss in doc.get("missing") or ():
            missing.setdefault(f"{miss.get('node')}/{miss.get('shard')}", miss)
        _warn_partial(doc, warned)
        nxt = doc.get("next")
        if not nxt:
            break
        if nxt <= after:
            raise ToolError(f"the node's cursor does not advance ({nxt!r} after {after!r})")
        after = nxt
        doc = fetch(url, prefix, after, ns.limit, timeout)
    tail = {"num_mailboxes": n, "prefix": prefix, "partial": bool(missing),
            "missing": list(missing.values())}
    w("\n], " + json.dumps(tail, ensure_ascii=False)[1:] + "\n")
    sys.stdout.flush()
    return 0
