"""Subject rules; the tables were measured against nats-server v2.15.1 (SUB gives
``-ERR 'Invalid Subject'``, pedantic PUB ``-ERR 'Invalid Publish Subject'``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mq9.protocol.subject_syntax import is_literal, valid_publish_subject, valid_subject

# (subject, valid for SUB, valid for pedantic PUB)
MEASURED = [
    ("a", True, True),
    ("a.b", True, True),
    ("a..b", False, False),
    (".a", False, False),
    ("a.", False, False),
    (".", False, False),
    ("*", True, False),
    (">", True, False),
    ("a.>", True, False),
    ("a.>.b", False, False),
    (">.a", False, False),
    ("a.*", True, False),
    ("*.*", True, False),
    ("a.*.b", True, False),
    ("a.b*", True, True),
    ("a.*b", True, True),
    ("a.b>", True, True),
    ("a.>b", True, True),
    ("**", True, True),
    (">>", True, True),
    ("a.**", True, True),
    ("$mq9.AI.#", True, True),
    ("#", True, True),
    ("a.#.b", True, True),
    ("$mq9.AI.INBOX.m-status-*.normal", True, True),
    ("a\x0cb", True, True),
    ("\x0c", True, True),
    ("a\x00b", True, True),
    ("a\x0bb", True, True),
    ("\udcff", True, True),  # a byte that is not UTF-8, as the parser hands it over
    ("ä.b", True, True),
    ("a\x7fb", True, True),
]


@pytest.mark.parametrize("subject,sub_ok,pub_ok", MEASURED)
def test_measured(subject, sub_ok, pub_ok):
    assert valid_subject(subject) is sub_ok
    assert valid_publish_subject(subject) is pub_ok


@pytest.mark.parametrize("subject", ["", "a b", "a\tb", "a.\r", "a\nb", " "])
def test_blank_and_whitespace(subject):
    assert not valid_subject(subject)
    assert not valid_publish_subject(subject)


def test_is_literal():
    assert is_literal("a.b") and is_literal("a.#.b") and is_literal("a.b>") and is_literal("#a")
    for s in ("*", ">", "a.*", "a.>", "a.#", "#", "a.m-*", "a.b*.c"):
        assert not is_literal(s), s


_token = st.text(alphabet="ab*>#.$-", min_size=0, max_size=4)


@given(st.lists(_token, min_size=1, max_size=5).map(".".join))
def test_publish_subjects_are_subjects(s):
    if valid_publish_subject(s):
        assert valid_subject(s)
        assert "" not in s.split(".")
    if valid_subject(s):
        tokens = s.split(".")
        assert ">" not in tokens[:-1]
