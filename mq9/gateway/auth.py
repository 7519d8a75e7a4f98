"""Users and permissions from ``--auth-file``: nats-server's authorization model.

The file is TOML (JSON when its name ends in ``.json``) with what nats-server's
``authorization { users = [...] }`` block holds::

    [[users]]
    user = "agent-a"
    password = "$2a$11$..."          # bcrypt, as `nats server passwd` makes; or plain text
    [users.permissions]
    publish = ["$mq9.AI.>"]          # a list (or one string) = allow
    subscribe = { allow = ["_INBOX.>", "$mq9.AI.>"], deny = ["$mq9.AI.BROADCAST.admin.>"] }
    allow_responses = true           # or { max = 1, expires = "2m" }

The same keys may sit under an ``authorization`` table, and ``default_permissions`` there
(or at the top) apply to users that have none of their own. Subscribe entries may name a
queue group after the subject (``"jobs.* workers"``), which then allows or denies only
that queue group, as in nats-server.

Semantics, measured against nats-server v2.15.1 (tests/test_security_diff.py):

- a subject is allowed when the allow list is absent or one of its patterns matches it,
  and no deny pattern does. Patterns match a subject token by token, the subject's own
  ``*``/``>`` being taken literally (so allow ``a.>`` permits ``SUB a.*``, allow ``a.b``
  does not); a subject with an empty token (``a..b``) matches nothing.
- a wildcard subscription that a deny pattern does not match is accepted, but messages
  whose subject a deny pattern matches are not delivered to the connection.
- ``allow_responses``: with it, a connection may publish to the reply subject of a message
  it was delivered, ``max`` times (default 1) within ``expires`` (default 2 minutes), even
  where its publish permissions say no. Without a publish allow list, publishing is then
  denied except for those replies.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
import tomllib
from typing import NamedTuple

import msgspec

MAX_CACHE = 4096  # cached verdicts per user, per gateway; cleared when full
# A password bcrypt accepted is taken without a new check for this long (per user, per
# gateway); refusals are never remembered. One hash accepts one password (bcrypt refuses
# more than 72 bytes), so the bound only matters for odd files.
VERIFIED_FOR = 300.0  # seconds
MAX_VERIFIED = 16
MAX_REPLIES = 4096  # reply subjects remembered per connection for allow_responses
DEFAULT_RESPONSE_MAX = 1
DEFAULT_RESPONSE_EXPIRES = 120.0  # seconds, nats-server's default

_BCRYPT = re.compile(r"^\$2[abxy]?\$\d\d\$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SECRET = os.urandom(32)  # keys the digests of remembered passwords


# ---- subject matching --------------------------------------------------------------------

def _tokens_match(pattern: list[str], tokens: list[str]) -> bool:
    n = len(tokens)
    for i, p in enumerate(pattern):
        if p == ">":
            return n > i
        if i >= n or (p != "*" and p != tokens[i]):
            return False
    return len(pattern) == n


class Patterns:
    """Subject patterns, each optionally with a queue group (subscribe entries only)."""

    __slots__ = ("plain", "queued")

    def __init__(self, entries: list[object], where: str, queues: bool):
        self.plain: list[list[str]] = []
        self.queued: list[tuple[list[str], str]] = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"{where}: subjects must be non-empty strings, got {entry!r}")
            parts = entry.split()
            if len(parts) > (2 if queues else 1):
                raise ValueError(f"{where}: not a subject{' [queue]' if queues else ''}: {entry!r}")
            tokens = parts[0].split(".")
            if "" in tokens or (">" in tokens and tokens.index(">") != len(tokens) - 1):
                raise ValueError(f"{where}: not a valid subject: {parts[0]!r}")
            if len(parts) == 2:
                self.queued.append((tokens, parts[1]))
            else:
                self.plain.append(tokens)

    def match(self, tokens: list[str]) -> tuple[bool, list[str]]:
        """Whether a plain pattern matches, and the queue groups of matching queue entries."""
        if "" in tokens:
            return False, []
        plain = any(_tokens_match(p, tokens) for p in self.plain)
        queues = [q for p, q in self.queued if _tokens_match(p, tokens)]
        return plain, queues


def _queue_in(queue: str, queues: list[str]) -> bool:
    # nats-server: the literal name first ('*' and '>' are valid queue names), then as a pattern
    qt = queue.split(".")
    for q in queues:
        if q == queue or (("*" in q or ">" in q) and _tokens_match(q.split("."), qt)):
            return True
    return False


# ---- permissions of one user ---------------------------------------------------------------

class ResponsePolicy(NamedTuple):
    """allow_responses: how often, and for how long, a delivered request may be answered."""

    max_msgs: int  # 0: no limit
    expires: float  # seconds; 0: never


class _Response(msgspec.Struct):
    """A reply subject the connection was delivered: when, and how often it answered."""

    since: float
    count: int = 0


class Permissions:
    """One user's permissions, with verdict caches shared by that user's connections."""

    def __init__(self, doc: object, where: str):
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: permissions must be a table")
        unknown = set(doc) - {"publish", "subscribe", "allow_responses"}
        if unknown:
            raise ValueError(f"{where}: unknown permission keys: {', '.join(sorted(unknown))}")
        self.doc = doc  # as written: a reload compares it to tell a changed user (``carry_over``)
        self.pub_allow, self.pub_deny = _allow_deny(doc.get("publish"), f"{where}.publish", False)
        self.sub_allow, self.sub_deny = _allow_deny(doc.get("subscribe"), f"{where}.subscribe", True)
        self.responses = _responses(doc.get("allow_responses"), f"{where}.allow_responses")
        if self.responses is not None and self.pub_allow is None:
            self.pub_allow = Patterns([], where, False)  # responses only, as nats-server does
        self.pub_cache: dict[str, bool] = {}
        self.deny_cache: dict[str, bool] = {}
        # Deliveries are checked only when something can be filtered or recorded.
        self.checks_delivery = self.responses is not None or bool(self.sub_deny and self.sub_deny.plain)

    def publish_allowed(self, subject: str) -> bool:
        ok = self.pub_cache.get(subject)
        if ok is None:
            tokens = subject.split(".")
            ok = self.pub_allow is None or self.pub_allow.match(tokens)[0]
            if ok and self.pub_deny is not None:
                ok = not self.pub_deny.match(tokens)[0]
            if len(self.pub_cache) >= MAX_CACHE:
                self.pub_cache.clear()
            self.pub_cache[subject] = ok
        return ok

    def subscribe_allowed(self, subject: str, queue: str | None) -> bool:
        # Not cached: SUB is rare next to PUB and deliveries.
        tokens = subject.split(".")
        ok = True
        if self.sub_allow is not None:
            plain, queues = self.sub_allow.match(tokens)
            ok = plain
            if queue and queues:
                ok = _queue_in(queue, queues)
        if ok and self.sub_deny is not None:
            plain, queues = self.sub_deny.match(tokens)
            ok = not plain
            if queue and queues:
                ok = not _queue_in(queue, queues)
        return ok

    def delivery_denied(self, subject: str) -> bool:
        """A message on ``subject`` must not reach this user (subscribe deny list)."""
        if self.sub_deny is None or not self.sub_deny.plain:
            return False
        denied = self.deny_cache.get(subject)
        if denied is None:
            denied = self.sub_deny.match(subject.split("."))[0]
            if len(self.deny_cache) >= MAX_CACHE:
                self.deny_cache.clear()
            self.deny_cache[subject] = denied
        return denied


class ConnPerms:
    """A connection's view of its user's permissions: adds the reply subjects it may
    answer (allow_responses), which are per connection."""

    __slots__ = ("perms", "replies", "pub_cache")

    def __init__(self, perms: Permissions):
        self.perms = perms
        # The user's verdicts (cleared in place, never replaced): the PUB hot path looks
        # here first, without a call (see Client._publish).
        self.pub_cache = perms.pub_cache
        self.replies: dict[str, _Response] | None = {} if perms.responses is not None else None

    def may_publish(self, subject: str) -> bool:
        if self.perms.publish_allowed(subject):
            return True
        replies, policy = self.replies, self.perms.responses
        if replies is None or policy is None:
            return False
        resp = replies.get(subject)
        if resp is None:
            return False
        max_msgs, expires = policy
        resp.count += 1
        if (max_msgs > 0 and resp.count > max_msgs) or (expires > 0 and time.monotonic() - resp.since > expires):
            del replies[subject]
            return False
        return True

    def may_subscribe(self, subject: str, queue: str | None) -> bool:
        return self.perms.subscribe_allowed(subject, queue)

    def deliverable(self, subject: str, reply: str | None) -> bool:
        """False if the message must not be delivered; remembers ``reply`` for
        allow_responses."""
        if self.perms.delivery_denied(subject):
            return False
        if reply and self.replies is not None:
            replies = self.replies
            if len(replies) >= MAX_REPLIES:
                self._prune()
            replies[reply] = _Response(time.monotonic())
        return True

    def _prune(self) -> None:
        replies, policy = self.replies, self.perms.responses
        if replies is None or policy is None:
            return
        expires = policy.expires
        now = time.monotonic()
        if expires > 0:
            for k in [k for k, v in replies.items() if now - v.since > expires]:
                del replies[k]
        if len(replies) >= MAX_REPLIES:  # still full: forget the oldest half
            for k in list(replies)[: len(replies) // 2]:
                del replies[k]


# ---- users ------------------------------------------------------------------------------------

class User:
    __slots__ = ("name", "password", "bcrypt", "perms", "_verified")

    def __init__(self, name: str, password: str, perms: Permissions | None):
        self.name = name
        self.password = password
        self.bcrypt = bool(_BCRYPT.match(password))
        self.perms = perms
        # Passwords bcrypt accepted, by keyed digest, until when the verdict holds. Kept by
        # this object: a reload that changes the user makes a new one, which knows none.
        self._verified: dict[bytes, float] = {}

    def check_fast(self, password: str) -> bool | None:
        """True/False, or None when only a bcrypt check (slow: run it off the loop) can tell."""
        if not self.bcrypt:
            return hmac.compare_digest(password.encode(), self.password.encode())
        until = self._verified.get(self._digest(password))
        if until is not None and until > time.monotonic():
            return True
        return None

    def check_slow(self, password: str) -> bool:
        """The bcrypt check; thread-safe (``bcrypt`` releases the GIL while hashing)."""
        import bcrypt

        try:
            return bcrypt.checkpw(password.encode(), self.password.encode())
        except ValueError:  # a malformed hash in the file (checked at load) or password
            return False

    def remember(self, password: str) -> None:
        """bcrypt accepted ``password``: ``check_fast`` says so for ``VERIFIED_FOR`` seconds."""
        now = time.monotonic()
        verified = self._verified
        if len(verified) >= MAX_VERIFIED:
            for k in [k for k, until in verified.items() if until <= now]:
                del verified[k]
            if len(verified) >= MAX_VERIFIED:
                verified.clear()
        verified[self._digest(password)] = now + VERIFIED_FOR

    def _digest(self, password: str) -> bytes:
        # Keyed with a secret of this process, and over the hash as written too, so that an
        # entry answers for this user, this hash and this password only.
        return hmac.digest(_SECRET, b"\0".join((self.name.encode(), self.password.encode(),
                                                password.encode())), "sha256")

    def conn_perms(self) -> ConnPerms | None:
        return ConnPerms(self.perms) if self.perms is not None else None

    def same_as(self, other: User) -> bool:
        """The same entry in the file: same name, password as written and permissions."""
        return (self.name == other.name and self.password == other.password
                and (self.perms.doc if self.perms else None) == (other.perms.doc if other.perms else None))


class Users(dict[str, User]):
    """user name -> User"""


def carry_over(old: Users | None, new: Users) -> Users:
    """``new`` with every user the reload left as it was replaced by its ``old`` object: a
    connection still holding that object needs no new check, and the bcrypt verdicts and
    permission caches are kept."""
    if old:
        for name, user in new.items():
            was = old.get(name)
            if was is not None and was.same_as(user):
                new[name] = was
    return new


def load(path: str) -> Users:
    """Read an auth file; ValueError (with the file name) on anything wrong."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ValueError(f"--auth-file {path}: {e.strerror}") from None
    try:
        doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--auth-file {path}: {e}") from None
    return parse(doc, path)


def parse(doc: object, where: str) -> Users:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a table with 'users'")
    if "authorization" in doc:
        doc = doc["authorization"]
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: 'authorization' must be a table")
    unknown = set(doc) - {"users", "default_permissions"}
    if unknown:
        raise ValueError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
    users_doc = doc.get("users")
    if not isinstance(users_doc, list) or not users_doc:
        raise ValueError(f"{where}: 'users' must be a non-empty list")
    default = None
    if doc.get("default_permissions") is not None:
        default = Permissions(doc["default_permissions"], f"{where}: default_permissions")
    users = Users()
    for i, u in enumerate(users_doc):
        at = f"{where}: users[{i}]"
        if not isinstance(u, dict):
            raise ValueError(f"{at}: must be a table")
        unknown = set(u) - {"user", "password", "permissions"}
        if unknown:
            raise ValueError(f"{at}: unknown keys: {', '.join(sorted(unknown))}")
        name, password = u.get("user"), u.get("password")
        if not isinstance(name, str) or not name or not isinstance(password, str):
            raise ValueError(f"{at}: needs 'user' and 'password' strings")
        if name in users:
            raise ValueError(f"{at}: duplicate user {name!r}")
        perms = Permissions(u["permissions"], f"{at}.permissions") if u.get("permissions") is not None else default
        user = User(name, password, perms)
        if user.bcrypt:
            try:
                import bcrypt  # noqa: F401 - a dependency; fail at start, not at first login
            except ImportError:
                raise ValueError(f"{at}: bcrypt password but the 'bcrypt' package is missing") from None
        users[name] = user
    return users


def _allow_deny(v: object, where: str, queues: bool) -> tuple[Patterns | None, Patterns | None]:
    if v is None:
        return None, None
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list):
        return Patterns(v, where, queues), None
    if isinstance(v, dict):
        unknown = set(v) - {"allow", "deny"}
        if unknown:
            raise ValueError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
        out = []
        for key in ("allow", "deny"):
            lst = v.get(key)
            if isinstance(lst, str):
                lst = [lst]
            if lst is not None and not isinstance(lst, list):
                raise ValueError(f"{where}.{key}: must be a list of subjects")
            out.append(Patterns(lst, f"{where}.{key}", queues) if lst is not None else None)
        return out[0], out[1]
    raise ValueError(f"{where}: must be a list of subjects or a table with allow/deny")


def _responses(v: object, where: str) -> ResponsePolicy | None:
    if v is None or v is False:
        return None
    if v is True:
        return ResponsePolicy(DEFAULT_RESPONSE_MAX, DEFAULT_RESPONSE_EXPIRES)
    if not isinstance(v, dict) or set(v) - {"max", "expires"}:
        raise ValueError(f"{where}: true, or a table with 'max' and 'expires'")
    max_msgs = v.get("max", DEFAULT_RESPONSE_MAX)
    if not isinstance(max_msgs, int) or isinstance(max_msgs, bool) or max_msgs < 0:
        raise ValueError(f"{where}.max: a count, got {max_msgs!r}")
    return ResponsePolicy(max_msgs, _duration(v.get("expires", DEFAULT_RESPONSE_EXPIRES), f"{where}.expires"))


def _duration(v: object, where: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    m = _DURATION.match(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError(f"{where}: seconds or a duration like '2m', '30s', '500ms', got {v!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]
