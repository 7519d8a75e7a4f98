"""The ``-ERR`` texts of nats-server, byte for byte.

Every text below was checked against nats-server v2.15.1 on 127.0.0.1 with a raw socket.
Capitalisation is inconsistent in nats-server itself (``Maximum Payload Violation`` but
``maximum control line exceeded``); clients match some of these strings, so keep them as is.

A text of ``""`` means nats-server closes the connection *without* sending any ``-ERR``;
``err_line("")`` is therefore ``b""`` so a caller can always write ``err_line(text)`` and
then act on the "closes" column.

| constant | what the server does |
|---|---|
| UNKNOWN_PROTOCOL_OP        | -ERR, closes |
| MAX_CONTROL_LINE_EXCEEDED  | -ERR, closes |
| MAX_PAYLOAD_VIOLATION      | -ERR, closes (checked on the PUB/HPUB line, before the payload) |
| AUTHORIZATION_VIOLATION    | -ERR, closes |
| AUTHENTICATION_TIMEOUT     | -ERR, closes |
| INVALID_SUBJECT            | -ERR, stays open (SUB ignored; a reused sid is ignored first) |
| INVALID_PUBLISH_SUBJECT    | -ERR, stays open (pedantic only; still delivered!) |
| STALE_CONNECTION           | -ERR, closes |
| MAX_CONNECTIONS_EXCEEDED   | -ERR right after INFO (before CONNECT), closes |
| MAX_SUBSCRIPTIONS_EXCEEDED | -ERR, stays open (SUB ignored) |
| INVALID_CLIENT_PROTOCOL    | -ERR, closes (CONNECT with ``protocol`` > 1) |
| NO_RESPONDERS_REQUIRES_HEADERS | -ERR, closes (``no_responders`` without ``headers``) |
| permissions_violation_*    | -ERR, stays open |
| subscription_removed       | -ERR, stays open (after a reload, per subscription it removed) |
| PARSE_ERROR                | nothing sent, closes |
| INVALID_CONNECT            | nothing sent, closes |
| HEADERS_NOT_SUPPORTED      | nothing sent, closes |
| SLOW_CONSUMER              | nothing sent, closes |
| CLIENT_SENT_ERR            | nothing sent, closes |

Timing details measured with the same server: an op other than CONNECT before CONNECT on a
server with auth gets AUTHORIZATION_VIOLATION at once; STALE_CONNECTION comes one
ping_interval after the ping_max-th unanswered PING; MAX_SUBSCRIPTIONS_EXCEEDED and the
permission errors leave the connection open.
"""

from __future__ import annotations

UNKNOWN_PROTOCOL_OP = "Unknown Protocol Operation"
# Lower case in v2.15.1, although it is often quoted as "Maximum Control Line Exceeded".
MAX_CONTROL_LINE_EXCEEDED = "maximum control line exceeded"
MAX_PAYLOAD_VIOLATION = "Maximum Payload Violation"
AUTHORIZATION_VIOLATION = "Authorization Violation"
AUTHENTICATION_TIMEOUT = "Authentication Timeout"
INVALID_SUBJECT = "Invalid Subject"
INVALID_PUBLISH_SUBJECT = "Invalid Publish Subject"
STALE_CONNECTION = "Stale Connection"
MAX_CONNECTIONS_EXCEEDED = "maximum connections exceeded"
MAX_SUBSCRIPTIONS_EXCEEDED = "maximum subscriptions exceeded"
INVALID_CLIENT_PROTOCOL = "invalid client protocol"
NO_RESPONDERS_REQUIRES_HEADERS = "no responders requires headers support"

# Silent closes. nats-server only logs these (e.g. ``processPub Parse Error``,
# ``message headers not supported``, ``Slow Consumer Detected``); the client just sees EOF.
PARSE_ERROR = ""  # wrong argument count, bad size, header size > total size
INVALID_CONNECT = ""  # CONNECT args that are not a JSON object (also empty args)
HEADERS_NOT_SUPPORTED = ""  # HPUB on a connection whose CONNECT lacked "headers": true
SLOW_CONSUMER = ""  # pending bytes over max_pending, or write deadline exceeded
CLIENT_SENT_ERR = ""  # a client that sends "-ERR ..." is disconnected


def permissions_violation_publish(subject: str) -> str:
    return f'Permissions Violation for Publish to "{subject}"'


def permissions_violation_subscribe(subject: str, queue: str | None = None) -> str:
    if queue:
        return f'Permissions Violation for Subscription to "{subject}" using queue "{queue}"'
    return f'Permissions Violation for Subscription to "{subject}"'


def subscription_removed(subject: str, queue: str | None, sid: str) -> str:
    """A subscription a config reload no longer allows: nats-server removes it and says
    so with its sid; the connection stays."""
    return permissions_violation_subscribe(subject, queue) + f' (sid "{sid}")'


def err_line(text: str) -> bytes:
    """The ``-ERR '...'`` line for ``text``; ``b""`` for the silent (close-only) cases."""
    if not text:
        return b""
    # surrogateescape: a permission error quotes the client's subject, which may hold
    # bytes that are not UTF-8 (see parser._dec)
    return b"-ERR '" + text.encode("utf-8", "surrogateescape") + b"'\r\n"
