"""Client commands of ``mq9`` for people, in the spirit of the ``nats`` CLI:

    mq9 mailbox create [--type standard|latest] [--ttl N] [--name NAME] [--json]
    mq9 mailbox delete MAIL_ID --token T
    mq9 mailbox list [--url http://HOST:9090] [--prefix P] [--limit N] [--all] [--json]
    mq9 send MAIL_ID [--priority urgent|normal|notify] [--ack] [--header K:V ...] BODY|-
    mq9 pub SUBJECT BODY|-
    mq9 sub SUBJECT [--queue Q] [--count N] [--raw|--json]
    mq9 query MAIL_ID --token T [--limit N] [--mark-read] [--json]
    mq9 request SUBJECT BODY|-
    mq9 bench [--workload NAME,...] [--messages N] [--size B] [--in-flight N] [--json]

Every one takes ``--server`` (else ``MQ9_SERVER``, else ``NATS_URL``), ``--auth-token`` /
``--user`` / ``--password`` for a broker started with auth, and ``--timeout`` (``mailbox list``
instead reads a node's metrics port: ``--url``, env ``MQ9_MONITOR_URL``). ``--token`` is always the
*mailbox* token (the one ``mailbox create`` prints). Failures are one line on stderr,
``mq9: ...``, and exit status 1.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, TypeVar

from mq9.tools.common import (
    PRIORITIES,
    add_connection_flags,
    positive_float,
    positive_int,
    whole_number,
)

COMMANDS = ("mailbox", "send", "pub", "sub", "query", "request", "bench")

P = TypeVar("P", bound=argparse.ArgumentParser)
if TYPE_CHECKING:
    # what ``add_subparsers`` returns (typeshed's generic; not subscriptable at run time)
    SubParsers = argparse._SubParsersAction[P]


def add_parsers(commands: SubParsers[P]) -> None:
    """Add the client commands to ``mq9``'s sub-parsers."""

    def add(where: SubParsers[P], name: str, help: str, description: str | None = None,
            **kw: Any) -> argparse.ArgumentParser:
        p = where.add_parser(name, help=help, description=description or help, **kw)
        add_connection_flags(p)
        return p

    mailbox = commands.add_parser("mailbox", help="create, delete or list mailboxes",
                                  description="Create or delete a mailbox; list mailboxes.")
    mb = mailbox.add_subparsers(dest="mailbox_command", metavar="ACTION")
    mb.required = True
    p = add(mb, "create", "create a mailbox; prints its mail_id and token",
            epilog="example: mq9 mailbox create --ttl 3600")
    p.add_argument("--type", choices=("standard", "latest"),
                   help="standard keeps every message (default); latest keeps the newest")
    p.add_argument("--ttl", type=_ttl, metavar="SECONDS",
                   help="lifetime in seconds (0 = never expires; the server's default if left "
                        "out)")
    p.add_argument("--name", help="the mail_id to use instead of a random one")
    p.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
    p = add(mb, "delete", "delete a mailbox and its messages now")
    p.add_argument("mail_id", metavar="MAIL_ID")
    p.add_argument("--token", required=True, help="the mailbox token from `mailbox create`")
    p.add_argument("--json", action="store_true", help="print the broker's reply as JSON")

    p = mb.add_parser(
        "list", help="list the mailboxes of a node or cluster (operators; no tokens needed)",
        description="List mailboxes from a node's monitoring endpoint (/mailboxz on its "
                    "metrics port), across the whole cluster: mail_id, type, unread messages "
                    "per priority (urgent/normal/notify), stored messages and bytes, expiry. "
                    "Shows no token and no message.",
        epilog="example: mq9 mailbox list --url http://10.0.0.5:9090 --prefix team. --all")
    p.add_argument("--url", metavar="URL",
                   help="the node's monitoring URL (env MQ9_MONITOR_URL, default "
                        "http://127.0.0.1:9090)")
    p.add_argument("--prefix", default="", metavar="P", help="only mail_ids starting with P")
    p.add_argument("--after", default="", metavar="MAIL_ID",
                   help="start after this mail_id (the 'next' of an earlier page)")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="mailboxes per page (default 100, with --all 1000; max 1000)")
    p.add_argument("--all", action="store_true", help="follow the pages to the end of the list")
    p.add_argument("--json", action="store_true", help="print JSON (the node's page document)")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                   help="HTTP timeout per page (default 15)")

    p = add(commands, "send", "send a message to a mailbox",
            description="Send BODY to the mailbox MAIL_ID ($mq9.AI.INBOX.MAIL_ID.PRIORITY). "
                        "BODY '-' reads standard input. Without --ack the message is published "
                        "and not confirmed (a send to an unknown mailbox is dropped); with "
                        "--ack the broker confirms it was stored and gives its msg_id.",
            epilog="example: mq9 send m-abc --priority urgent --ack '{\"task\": 1}'")
    p.add_argument("mail_id", metavar="MAIL_ID")
    p.add_argument("body", metavar="BODY", help="message body, or - for standard input")
    p.add_argument("-p", "--priority", choices=PRIORITIES, default="normal",
                   help="default normal")
    p.add_argument("--ack", action="store_true",
                   help="wait for the broker to confirm the message is stored; print msg_id")
    p.add_argument("-H", "--header", action="append", metavar="KEY:VALUE",
                   help="a message header (repeatable)")
    p.add_argument("--count", type=positive_int, default=1, metavar="N",
                   help="send the message N times (progress on stderr)")
    p.add_argument("--json", action="store_true", help="with --ack: print the replies as JSON")

    p = add(commands, "pub", "publish a message to any subject (broadcast)",
            description="Publish BODY to SUBJECT, e.g. $mq9.AI.BROADCAST.domain.event. "
                        "BODY '-' reads standard input.",
            epilog="example: mq9 pub '$mq9.AI.BROADCAST.pipeline.complete' '{\"ok\": true}'")
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("body", metavar="BODY", nargs="?", default="",
                   help="message body (default empty), or - for standard input")
    p.add_argument("-H", "--header", action="append", metavar="KEY:VALUE",
                   help="a message header (repeatable)")
    p.add_argument("--count", type=positive_int, default=1, metavar="N",
                   help="publish the message N times (progress on stderr)")

    p = add(commands, "sub", "print the messages on a subject as they arrive",
            description="Subscribe to SUBJECT and print each message: time, subject, "
                        "msg_id and priority when the broker gives them, other headers, and "
                        "the body (JSON pretty-printed). A mailbox's own subject "
                        "($mq9.AI.INBOX.MAIL_ID.*) first replays its undelivered messages and "
                        "marks what it receives delivered; wildcards over mail_ids "
                        "($mq9.AI.#, $mq9.AI.INBOX.*.normal) only watch live traffic.",
            epilog="example: mq9 sub '$mq9.AI.#'   (quote the $ from the shell)")
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("-q", "--queue", metavar="GROUP", help="join this queue group")
    p.add_argument("-n", "--count", type=positive_int, metavar="N",
                   help="exit after N messages")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--raw", action="store_true", help="print only each body, one per line")
    fmt.add_argument("--json", action="store_true",
                     help="print one JSON object per message (subject, headers, data)")

    p = add(commands, "query", "list a mailbox's unread messages",
            description="Ask for MAIL_ID's undelivered messages (in delivery order) without "
                        "subscribing.")
    p.add_argument("mail_id", metavar="MAIL_ID")
    p.add_argument("--token", required=True, help="the mailbox token from `mailbox create`")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="at most N messages (server default 100, max 1000)")
    p.add_argument("--mark-read", action="store_true",
                   help="mark the listed messages delivered")
    p.add_argument("--json", action="store_true", help="print the broker's reply as JSON")

    p = add(commands, "request", "send a request and print the reply",
            description="Publish BODY to SUBJECT with a reply inbox and print the first reply. "
                        "BODY '-' reads standard input.")
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("body", metavar="BODY", nargs="?", default="",
                   help="request body (default empty), or - for standard input")
    p.add_argument("-H", "--header", action="append", metavar="KEY:VALUE",
                   help="a request header (repeatable)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--raw", action="store_true", help="print the reply body as is")
    fmt.add_argument("--json", action="store_true", help="print the reply as JSON")

    from mq9.tools import bench

    bench.add_parser(commands, add)


def _ttl(text: str) -> int:
    return whole_number(text, 0, "whole number of seconds", "must be 0 (never) or more")


def run(ns: argparse.Namespace) -> int:
    """Run the client command ``ns`` was parsed for."""
    from mq9.tools import common, mailbox, messages, sub

    if ns.command == "mailbox" and ns.mailbox_command == "list":
        from mq9.tools import mailbox_list

        return mailbox_list.main(ns)
    if ns.command == "mailbox":
        fn = {"create": mailbox.create, "delete": mailbox.delete}[ns.mailbox_command]
        return common.execute(fn, ns)
    if ns.command == "bench":
        from mq9.tools import bench

        return bench.run(ns)
    if ns.command == "sub":
        return common.execute(sub.sub, ns, subject_checks=False, quiet_reconnects=False)
    fn = {"send": messages.send, "pub": messages.pub, "query": mailbox.query,
          "request": messages.req}[ns.command]
    return common.execute(fn, ns)
