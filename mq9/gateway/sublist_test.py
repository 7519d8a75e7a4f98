"""Tests for the subscription index, including a brute-force reference matcher."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings, stateful
from hypothesis import strategies as st

from mq9.gateway.sublist import Sublist


def ref_matches(pattern: str, subject: str) -> bool:
    """NATS matching plus the mq9 extensions, token by token."""
    s = subject.split(".")
    if "" in s:
        return False
    p = pattern.split(".")
    if p[-1] == "#":
        p[-1] = ">"
    for i, t in enumerate(p):
        if t == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if t == "*":
            continue
        if len(t) > 1 and t.endswith("*"):
            if not s[i].startswith(t[:-1]):
                return False
            continue
        if t != s[i]:
            return False
    return len(s) == len(p)


def as_counters(result) -> tuple[Counter, dict[str, Counter]]:
    plain, queues = result
    return Counter(plain), {q: Counter(items) for q, items in queues.items() if items}


def ref_result(entries: Counter, subject: str) -> tuple[Counter, dict[str, Counter]]:
    plain: Counter = Counter()
    queues: dict[str, Counter] = {}
    for (pattern, item, queue), n in entries.items():
        if n and ref_matches(pattern, subject):
            if queue is None:
                plain[item] += n
            else:
                queues.setdefault(queue, Counter())[item] += n
    return plain, queues


# --- unit --------------------------------------------------------------------------------

def test_literals_and_wildcards():
    sl = Sublist()
    sl.insert("a.b", 1)
    sl.insert("a.*", 2)
    sl.insert("a.>", 3)
    sl.insert(">", 4)
    sl.insert("*.b", 5)
    sl.insert("a.b.c", 6)
    assert sorted(sl.match("a.b")[0]) == [1, 2, 3, 4, 5]
    assert sorted(sl.match("a.b.c")[0]) == [3, 4, 6]
    assert sorted(sl.match("a")[0]) == [4]  # '>' needs at least one token
    assert sl.match("x.y.z") == ((4,), {})
    assert len(sl) == 6


def test_mq9_extensions():
    sl = Sublist()
    sl.insert("$mq9.AI.#", "all")
    sl.insert("$mq9.AI.INBOX.m-status-*.normal", "prefix")
    sl.insert("a.#.b", "literal-hash")
    assert sorted(sl.match("$mq9.AI.INBOX.m-status-1.normal")[0]) == ["all", "prefix"]
    assert sl.match("$mq9.AI.INBOX.m-status-.normal")[0] == ("all", "prefix")
    assert sl.match("$mq9.AI.INBOX.m-other.normal")[0] == ("all",)
    assert sl.match("$mq9.AI")[0] == ()  # like '>', '#' needs a token
    assert sl.match("a.#.b")[0] == ("literal-hash",)
    assert sl.match("a.x.b")[0] == ()
    sl.insert("x.**", "star-prefix")
    assert sl.match("x.*y")[0] == ("star-prefix",)
    assert sl.match("x.y")[0] == ()


def test_queues():
    sl = Sublist()
    sl.insert("a.*", "s1", "q")
    sl.insert("a.b", "s2", "q")
    sl.insert("a.b", "s3", "r")
    sl.insert("a.b", "p")
    plain, queues = sl.match("a.b")
    assert plain == ("p",)
    assert {q: sorted(v) for q, v in queues.items()} == {"q": ["s1", "s2"], "r": ["s3"]}
    assert sl.remove("a.b", "s3", "r")
    assert "r" not in sl.match("a.b")[1]
    assert not sl.remove("a.b", "s2")  # wrong queue
    assert not sl.remove("a.b", "s2", "r")


def test_same_item_under_several_patterns_and_twice():
    sl = Sublist()
    sl.insert("a.b", "x")
    sl.insert("a.*", "x")
    assert sl.match("a.b")[0] == ("x", "x")
    sl.insert("a.b", "x")
    assert Counter(sl.match("a.b")[0]) == {"x": 3}
    assert sl.remove("a.b", "x")
    assert Counter(sl.match("a.b")[0]) == {"x": 2}
    assert sl.remove("a.b", "x") and sl.remove("a.*", "x")
    assert not sl.remove("a.b", "x")
    assert sl.match("a.b") == ((), {}) and len(sl) == 0


def test_publish_subjects_are_literal():
    sl = Sublist()
    sl.insert("a.*", 1)
    sl.insert("a.b", 2)
    sl.insert(">", 3)
    # nats-server: a publish to "a.*" reaches "a.*" and ">" subscribers, not "a.b"
    assert sorted(sl.match("a.*")[0]) == [1, 3]
    for bad in ("a..b", ".a", "a.", ".", ""):
        assert sl.match(bad) == ((), {})
        assert not sl.has_interest(bad)


def test_remove_prunes_the_trie():
    sl = Sublist()
    subjects = ["a.b.c", "a.*.c", "a.>", "a.m-*.c", "$mq9.#", "x"]
    for i, s in enumerate(subjects):
        sl.insert(s, i, "q" if i % 2 else None)
    for i, s in enumerate(subjects):
        assert sl.remove(s, i, "q" if i % 2 else None)
    assert sl._root.empty() and len(sl) == 0


def test_invalid_full_wildcard_position():
    sl = Sublist()
    with pytest.raises(ValueError):
        sl.insert("a.>.b", 1)
    assert sl._root.empty() and len(sl) == 0
    assert not sl.remove("a.>.b", 1)


def test_deep_wildcard_chains():
    sl = Sublist()
    deep = ".".join(["*"] * 3000)
    sl.insert(deep, "stars")
    sl.insert(".".join(["a"] * 2999) + ".>", "fwc")
    assert sorted(sl.match(".".join(["a"] * 3000))[0]) == ["fwc", "stars"]
    assert sl.remove(deep, "stars")


def test_has_interest():
    sl = Sublist()
    assert not sl.has_interest("a")
    sl.insert("a", 1, "q")
    assert sl.has_interest("a") and not sl.has_interest("b")


def test_inbox_replies_are_not_cached():
    sl = Sublist()
    sl.insert("_INBOX.a.*", "a")
    assert sl.match("_INBOX.a.1")[0] == ("a",)
    assert not sl._cache


def test_cache_follows_inserts_and_removes():
    sl = Sublist()
    sl.insert("rep.a.*", "a")
    sl.insert("rep.b.*", "b")
    sl.insert("foo", "f")
    for s in ("rep.a.1", "rep.b.1", "foo", "bar"):
        sl.match(s)
    sl.insert("rep.a.*", "a2")
    # only what the new pattern can match was dropped
    assert set(sl._cache) == {"rep.b.1", "foo", "bar"}
    assert sorted(sl.match("rep.a.1")[0]) == ["a", "a2"]
    sl.insert("bar", "b")
    assert set(sl._cache) == {"rep.b.1", "foo", "rep.a.1"}
    assert sl.match("bar")[0] == ("b",)
    sl.insert("rep.b.m-*", "pfx")
    sl.match("rep.b.m-1")
    sl.remove("rep.b.m-*", "pfx")
    assert "rep.b.m-1" not in sl._cache and "rep.b.1" in sl._cache
    sl.insert("*.x", "w")  # leading wildcard: everything goes
    assert not sl._cache


def test_cache_is_bounded():
    sl = Sublist(cache_size=64)
    sl.insert("a.*", 1)
    for i in range(1000):
        assert sl.match(f"a.{i}")[0] == (1,)
        assert len(sl._cache) <= 64


# --- properties --------------------------------------------------------------------------

_TOKENS = ["a", "b", "ab", "*", ">", "#", "a*", "m-*", "m-1", "m-", "$x"]
_pattern = st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=4).map(".".join).filter(
    lambda p: ">" not in p.split(".")[:-1])
_subject = st.lists(st.sampled_from(["a", "b", "ab", "m-1", "m-", "m-12", "*", ">", "#", "$x", ""]),
                    min_size=1, max_size=5).map(".".join)
_item = st.integers(0, 5)
_queue = st.sampled_from([None, "q", "r"])


def _same_as(pattern: str) -> str:
    # A trailing '#' is the same subscription subject as '>' (one slot in the trie).
    return pattern[:-1] + ">" if pattern == "#" or pattern.endswith(".#") else pattern


@st.composite
def _pattern_for(draw, subject: str) -> str:
    """A pattern that matches ``subject`` (if it has no empty token), so that inserting it
    must change a cached result."""
    tokens = subject.split(".")
    i = draw(st.integers(0, len(tokens) - 1))
    how = draw(st.sampled_from(["*", ">", "#", "prefix", "literal"]))
    if how == "*":
        tokens[i] = "*"
    elif how in (">", "#"):
        tokens[i:] = [how]
    elif how == "prefix":
        tokens[i] = tokens[i][:draw(st.integers(0, len(tokens[i])))] + "*"
    # a literal '>' token of the subject can only be matched by '*' before the end
    return ".".join(["*" if t == ">" else t for t in tokens[:-1]] + tokens[-1:])


class SublistMachine(stateful.RuleBasedStateMachine):
    subjects = stateful.Bundle("subjects")
    patterns = stateful.Bundle("patterns")

    def __init__(self):
        super().__init__()
        self.sl = Sublist(cache_size=8)
        self.entries: Counter = Counter()

    def _insert(self, pattern, item, queue):
        self.sl.insert(pattern, item, queue)
        self.entries[(_same_as(pattern), item, queue)] += 1
        return pattern

    @stateful.rule(target=patterns, pattern=_pattern, item=_item, queue=_queue)
    def insert(self, pattern, item, queue):
        return self._insert(pattern, item, queue)

    @stateful.rule(target=patterns, data=st.data(), subject=subjects, item=_item, queue=_queue)
    def insert_matching(self, data, subject, item, queue):
        return self._insert(data.draw(_pattern_for(subject)), item, queue)

    @stateful.rule(pattern=patterns, item=_item, queue=_queue)
    def remove(self, pattern, item, queue):
        key = (_same_as(pattern), item, queue)
        present = self.entries[key] > 0
        assert self.sl.remove(pattern, item, queue) is present
        if present:
            self.entries[key] -= 1

    @stateful.rule(target=subjects, subject=_subject)
    def match_new(self, subject):
        self._check(subject)
        return subject

    @stateful.rule(subject=subjects)
    def match_again(self, subject):
        self._check(subject)

    def _check(self, subject):
        assert as_counters(self.sl.match(subject)) == ref_result(self.entries, subject)
        assert self.sl.has_interest(subject) == any(ref_result(self.entries, subject))

    @stateful.invariant()
    def count(self):
        assert len(self.sl) == sum(self.entries.values())

    @stateful.invariant()
    def cache_index_mirrors_cache(self):
        indexed = [s for group in self.sl._by_parent.values() for s in group]
        assert sorted(indexed) == sorted(self.sl._cache)
        assert all(self.sl._by_parent.values())


class SublistMachineBigCache(SublistMachine):
    """The same with a cache that never fills, so entries live long enough to go stale."""

    def __init__(self):
        super().__init__()
        self.sl = Sublist()


_machine_settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
SublistMachine.TestCase.settings = _machine_settings
SublistMachineBigCache.TestCase.settings = _machine_settings
test_sublist_against_reference = SublistMachine.TestCase
test_sublist_against_reference_big_cache = SublistMachineBigCache.TestCase


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_pattern, st.sampled_from([None, "q"])), max_size=25),
       st.lists(_subject, min_size=1, max_size=10))
def test_bulk_matches_agree_with_reference(patterns, subjects):
    sl = Sublist()
    entries: Counter = Counter()
    for i, (p, q) in enumerate(patterns):
        sl.insert(p, i, q)
        entries[(p, i, q)] += 1
    for s in subjects + subjects:  # the second round comes from the cache
        assert as_counters(sl.match(s)) == ref_result(entries, s)


# --- speed -------------------------------------------------------------------------------

def test_benchmark_match():
    sl = Sublist()
    for i in range(1000):
        sl.insert(f"_INBOX.c{i}.*", i)
        sl.insert(f"$mq9.AI.INBOX.m-{i}.*", i, "workers")
    for i in range(100):
        sl.insert(f"foo.bar.{i}", i)
    sl.insert("foo.>", "monitor")
    sl.insert("$mq9.AI.#", "monitor")
    hot = [f"foo.bar.{i}" for i in range(100)] * 100
    unique = [f"_INBOX.c{i % 1000}.{i}" for i in range(10_000)]

    def best(fn):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    match = sl.match
    hit = best(lambda: [match(s) for s in hot]) / len(hot)
    miss = best(lambda: [match(s) for s in unique]) / len(unique)
    for s in [f"foo.bar.{i}" for i in range(100)]:
        match(s)
    t = time.perf_counter()
    sl.insert("_INBOX.new.*", "x")  # unrelated wildcard: the cache stays
    churn = time.perf_counter() - t
    print(f"\nsublist: cached match {hit * 1e9:.0f} ns, uncached match {miss * 1e9:.0f} ns, "
          f"wildcard insert with a warm cache {churn * 1e6:.0f} us")
    assert hit < 20e-6 and miss < 200e-6
