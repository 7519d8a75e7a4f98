"""The client API of mq9's mailboxes, defined once: request bodies, JSON replies, error
codes and error texts.

| subject | request body | reply |
|---|---|---|
| ``$mq9.AI.MAILBOX.CREATE`` | ``CreateRequest`` | ``Created`` |
| ``$mq9.AI.MAILBOX.QUERY.{mail_id}`` | ``QueryRequest`` | ``QueryReply`` of ``Message`` |
| ``$mq9.AI.MAILBOX.DELETE.{mail_id}`` | ``DeleteRequest`` | ``Deleted`` |
| ``$mq9.AI.INBOX.{mail_id}.{priority}`` | the message itself | ``SendAck`` |

Every refusal is an ``Error`` reply: a ``Code`` and a text from this module. A request body
is validated once, by the gateway (``create_request`` ...), before anything reaches a shard.
The shard answers what only it knows (exists, token, room) with the same codes and texts;
it does not trust a wire op's fields either, and checks them with the same functions
(``check_type``, ``check_int``, ``check_priority``). Bodies are read leniently: unknown
fields are ignored, ``null`` means the default, a token that is no string is a wrong token.

Replies are on the acked-send hot path, so they are encoded by msgspec (field order is the
JSON order); the send ack is a byte template made once per INBOX subject from ``SendAck``.
"""

from __future__ import annotations

import base64
import enum
import json

import msgspec

from mq9 import subjects


class Code(enum.StrEnum):
    """The ``code`` of an error reply."""

    BAD_REQUEST = "bad_request"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    AUTH = "auth"
    FULL = "full"
    UNAVAILABLE = "unavailable"
    MOVED = "moved"  # between gateway and shard only: the gateway retries at the new owner
    INTERNAL = "internal"


# ---- error texts ---------------------------------------------------------------------------

BAD_JSON = "body is not valid JSON"
NOT_AN_OBJECT = "body must be a JSON object"
UNKNOWN_OPERATION = ("unknown mailbox operation: use $mq9.AI.MAILBOX.CREATE, "
                     "QUERY.{mail_id} or DELETE.{mail_id}")
BAD_TYPE = "'type' must be \"standard\" or \"latest\""
BAD_NAME = "'name' must be 1-128 letters, digits, '-', '_', with '.' between tokens"
BAD_MAIL_ID = "invalid mail_id"
BAD_MARK_READ = "'mark_read' must be true or false"
BAD_INBOX_SUBJECT = "send to $mq9.AI.INBOX.{mail_id}.{urgent|normal|notify}"
UNKNOWN_PRIORITY = "unknown priority '{}': use urgent, normal or notify"
NOT_AN_INTEGER = "'{}' must be an integer"
NOT_BETWEEN = "'{}' must be between {} and {}"
NOT_AT_LEAST = "'{}' must be >= {}"
EXISTS = "mailbox '{}' already exists"
NOT_FOUND = "no mailbox '{}'"
WRONG_TOKEN = "wrong or missing token"
FULL = "mailbox '{}' is full ({} undelivered messages)"
MOVED = "mailbox is moving; retry"
STORAGE_FAILING = "mailbox storage is failing (disk full or not writable); retry later"
INTERNAL = "internal error: {}"
UNENCODABLE = "reply could not be encoded"
NO_ROUTE = "no route to the shard that owns this mailbox ({})"
NO_ROUTE_TO_NEW_OWNER = "no route to the new owner"
STILL_MOVING = "mailbox is moving between nodes; retry"
SHARD_TIMEOUT = "mailbox shard did not answer in time"

MAILBOX_TYPES = ("standard", "latest")
MAX_TTL = 100 * 365 * 86400  # a century: larger values only overflow timestamps
QUERY_MAX = 1000


class BadRequest(Exception):
    """A request the gateway refuses with ``Code.BAD_REQUEST`` and this text."""


# ---- requests --------------------------------------------------------------------------------

class CreateRequest(msgspec.Struct):
    type: str = "standard"  # one of MAILBOX_TYPES
    ttl: int = 0  # seconds, 0 = never expires; absent: the node's default_ttl setting
    name: str | None = None  # None: the gateway names the mailbox


class QueryRequest(msgspec.Struct):
    token: str = ""
    limit: int = 100
    mark_read: bool = False


class DeleteRequest(msgspec.Struct):
    token: str = ""


_json_dec = msgspec.json.Decoder().decode


def _json_object(payload: bytes) -> dict[str, object]:
    if not payload.strip():
        return {}
    try:
        body = _json_dec(payload)
    except (ValueError, RecursionError):  # DecodeError and UnicodeDecodeError are ValueErrors
        # msgspec is stricter than json (NaN, 1e400, lone surrogates); whatever it accepts,
        # json reads the same, so only its refusals get the slower second opinion.
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest(BAD_JSON) from None
    if not isinstance(body, dict):
        raise BadRequest(NOT_AN_OBJECT)
    return body


def check_int(name: str, v: object, lo: int, hi: int | None = None) -> str | None:
    """Why ``v`` is no valid value of integer field ``name``, or None."""
    if isinstance(v, bool) or not isinstance(v, int):
        return NOT_AN_INTEGER.format(name)
    if v < lo or (hi is not None and v > hi):
        return NOT_BETWEEN.format(name, lo, hi) if hi is not None else NOT_AT_LEAST.format(name, lo)
    return None


def _int_field(body: dict[str, object], name: str, default: int, lo: int, hi: int | None = None) -> int:
    v = body.get(name, default)
    if v is None:
        return default
    why = check_int(name, v, lo, hi)
    if why:
        raise BadRequest(why)
    assert isinstance(v, int)  # what check_int found
    return v


def check_type(mtype: object) -> str | None:
    return None if mtype in MAILBOX_TYPES else BAD_TYPE


def check_priority(priority: str) -> str | None:
    return None if priority in subjects.PRIORITY_BIT else UNKNOWN_PRIORITY.format(priority)


def _token(body: dict[str, object]) -> str:
    tok = body.get("token")
    return tok if isinstance(tok, str) else ""


def create_request(payload: bytes, default_ttl: int) -> CreateRequest:
    body = _json_object(payload)
    mtype = body.get("type", "standard")
    if mtype is None:
        mtype = "standard"
    if not isinstance(mtype, str) or check_type(mtype):
        raise BadRequest(BAD_TYPE)
    ttl = _int_field(body, "ttl", default_ttl, 0, MAX_TTL)
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not subjects.valid_mail_id(name)):
        raise BadRequest(BAD_NAME)
    return CreateRequest(mtype, ttl, name)


def query_request(payload: bytes, mail_id: str) -> QueryRequest:
    body = _json_object(payload)
    if not subjects.valid_mail_id(mail_id):
        raise BadRequest(BAD_MAIL_ID)
    limit = _int_field(body, "limit", 100, 1, QUERY_MAX)
    mark = body.get("mark_read", False)
    if not isinstance(mark, bool):
        raise BadRequest(BAD_MARK_READ)
    return QueryRequest(_token(body), limit, mark)


def delete_request(payload: bytes, mail_id: str) -> DeleteRequest:
    body = _json_object(payload)
    if not subjects.valid_mail_id(mail_id):
        raise BadRequest(BAD_MAIL_ID)
    return DeleteRequest(_token(body))


# ---- replies ---------------------------------------------------------------------------------

class Error(msgspec.Struct):
    error: str
    code: str  # a Code's value; a shard's answer (wire.Result.code, a str) passes through as is


class Created(msgspec.Struct, omit_defaults=True):
    mail_id: str
    type: str
    ttl: int
    expires_at: int  # unix seconds, rounded up; 0 = never
    token: str | None = None  # added by the gateway: the shard only ever sees its hash


class Message(msgspec.Struct, omit_defaults=True):
    msg_id: int
    priority: str
    subject: str
    ts: int  # unix milliseconds, when stored
    payload: str
    encoding: str | None = None  # "base64" when the payload is not UTF-8


class QueryReply(msgspec.Struct):
    mail_id: str
    unread: int  # undelivered messages left, these included
    messages: list[Message]


class Deleted(msgspec.Struct):
    mail_id: str
    deleted: bool = True


class SendAck(msgspec.Struct):
    mail_id: str
    msg_id: int
    priority: str


encode = msgspec.json.Encoder().encode
to_builtins = msgspec.to_builtins


def message(msg_id: int, priority: str, subject: str, ts: int, payload: bytes) -> Message:
    try:
        return Message(msg_id, priority, subject, ts, payload.decode("utf-8"))
    except UnicodeDecodeError:
        return Message(msg_id, priority, subject, ts, base64.b64encode(payload).decode(), "base64")


def error_body(code: str, text: str) -> bytes:
    # The text may quote a subject, which need not be valid UTF-8.
    return encode(Error(text.encode("utf-8", "replace").decode(), code))


def send_ack_template(mail_id: str, priority: str) -> tuple[bytes, bytes]:
    """The encoded ``SendAck`` before and after its msg_id: an ack is ``head + id + tail``.
    (mail_id and priority are validated ASCII without quotes, so the split is exact.)"""
    body = encode(SendAck(mail_id, 0, priority))
    at = body.index(b'"msg_id":0') + len(b'"msg_id":')
    return body[:at], body[at + 1:]
