"""Subject syntax: whether a string is a valid NATS subject, as nats-server checks SUB and
(pedantic) PUB. What a valid subject means to mq9 is ``mq9.subjects``.

Measured against nats-server v2.15.1:
- tokens are separated by ``.`` and must not be empty (``a..b``, ``.a``, ``a.`` are invalid);
- ``*`` and ``>`` are wildcards only as whole tokens; ``>`` must be the last token
  (``a.>.b`` is invalid). ``a.b*``, ``a.*b``, ``a.b>``, ``**``, ``#`` are ordinary tokens;
- nothing else is checked: ``$``, UTF-8, bytes that are not UTF-8, NUL, form feed and
  vertical tab are accepted. Space, tab, CR and LF cannot reach a subject through the
  protocol (they separate arguments or end the line), but these functions refuse them so
  they are safe for subjects from elsewhere. (One consequence: a pedantic ``PUB a.<CR> 0``,
  which nats-server accepts, is refused here.)
- a pedantic PUB refuses any subject that is not a valid subject or has a ``*``/``>``
  token: "Invalid Publish Subject". The reply subject is not checked.

mq9 extensions (SPEC §1), valid in SUB subjects and already valid as literals in NATS:
- a trailing ``#`` token subscribes like ``>`` (``$mq9.AI.#``); elsewhere ``#`` is literal;
- a token ending in ``*`` after other characters (``m-status-*``) matches every token that
  starts with the part before the ``*``.
A publish subject treats both as literal characters, as NATS does.
"""

from __future__ import annotations


def _no_blanks(s: str) -> bool:
    return " " not in s and "\t" not in s and "\r" not in s and "\n" not in s


def valid_subject(s: str) -> bool:
    """A subject a client may subscribe to."""
    if not s:
        return False
    tokens = s.split(".")
    if "" in tokens:
        return False
    if ">" in tokens and tokens.index(">") != len(tokens) - 1:
        return False
    return _no_blanks(s)


def valid_publish_subject(s: str) -> bool:
    """A subject a pedantic client may publish to: valid and without wildcard tokens."""
    if not s:
        return False
    tokens = s.split(".")
    if "" in tokens or "*" in tokens or ">" in tokens:
        return False
    return _no_blanks(s)


def is_literal(s: str) -> bool:
    """True if ``s`` as a subscription matches only itself (no wildcard of any kind,
    mq9 extensions included)."""
    if "*" not in s and ">" not in s and "#" not in s:
        return True
    for t in s.split("."):
        if t == ">" or t.endswith("*"):
            return False
    return not s.endswith(".#") and s != "#"
