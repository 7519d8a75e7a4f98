"""The mq9 subject namespace: what a subject means to the broker.

One place knows how ``$mq9.AI.*`` subjects are spelled, so the gateway (which routes) and the
shard (which stores) never disagree about which mailbox a subject names. Whether a string
is a valid NATS subject at all is ``mq9.protocol.subject_syntax``.
"""

from __future__ import annotations

import re

PREFIX = "$mq9.AI."
INBOX = "$mq9.AI.INBOX."
MAILBOX = "$mq9.AI.MAILBOX"
MAILBOX_CREATE = "$mq9.AI.MAILBOX.CREATE"
MAILBOX_QUERY = "$mq9.AI.MAILBOX.QUERY."
MAILBOX_DELETE = "$mq9.AI.MAILBOX.DELETE."
BROADCAST = "$mq9.AI.BROADCAST."

# Delivery order: urgent first, then normal, then notify.
PRIORITIES = ("urgent", "normal", "notify")
PRIORITY_BIT = {"urgent": 1, "normal": 2, "notify": 4}
ALL_PRIORITIES = 7

MAX_MAIL_ID = 128
_MAIL_ID = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


_MAIL_ID_CHARS = re.compile(r"[A-Za-z0-9_.-]*")


def valid_mail_id(mail_id: str) -> bool:
    return 0 < len(mail_id) <= MAX_MAIL_ID and _MAIL_ID.fullmatch(mail_id) is not None


def valid_mail_id_part(text: str) -> bool:
    """Could ``text`` begin a mail_id, or be empty? (a list's prefix filter or cursor)"""
    return len(text) <= MAX_MAIL_ID and _MAIL_ID_CHARS.fullmatch(text) is not None


def parse_inbox(subject: str) -> tuple[str, str] | None:
    """``$mq9.AI.INBOX.{mail_id}.{priority}`` -> (mail_id, priority), priority unchecked.

    The mail_id may contain dots, so the priority is the last token and the mail_id is
    everything between ``INBOX.`` and it.
    """
    if not subject.startswith(INBOX):
        return None
    rest = subject[len(INBOX):]
    dot = rest.rfind(".")
    if dot <= 0 or dot == len(rest) - 1:
        return None
    return rest[:dot], rest[dot + 1:]


def owner_subscription(subject: str) -> tuple[str, int] | None:
    """If ``subject`` names exactly one mailbox, return (mail_id, priority bitmask).

    ``INBOX.{id}.*`` and ``INBOX.{id}.>`` take every priority, ``INBOX.{id}.urgent`` one.
    A wildcard anywhere in the mail_id part makes it a monitor, not an owner: monitors see
    live traffic only and never mark anything delivered.
    """
    parsed = parse_inbox(subject)
    if parsed is None:
        return None
    mail_id, last = parsed
    if not valid_mail_id(mail_id):
        return None
    if last in ("*", ">"):
        return mail_id, ALL_PRIORITIES
    bit = PRIORITY_BIT.get(last)
    if bit is None:
        return None
    return mail_id, bit


KINDS = ("plain", "broadcast", "mailbox")  # how metrics split traffic


def kind_of(subject: str) -> int:
    """Index into KINDS: plain NATS, a broadcast, or any other ``$mq9.AI`` subject."""
    if subject[:1] != "$" or not subject.startswith(PREFIX):
        return 0
    return 1 if subject.startswith(BROADCAST) else 2
