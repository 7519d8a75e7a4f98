"""The subscription index: which subscriptions (local or another gateway's) match a subject.

A trie with one level per token. Each node has literal children, a ``*`` child, a ``>``
leaf and prefix-wildcard children (``m-status-*``, an mq9 extension); a trailing ``#``
(also mq9) is stored as ``>``. A publish subject is matched by walking all branches that
accept each token, collecting the items of the nodes reached at the end and of every ``>``
leaf passed on the way (``>`` needs at least one token).

Results are cached per subject (bounded), since a broker sees the same subjects over and
over. On insert/remove only the entries that can be affected are dropped: for a literal
pattern the one entry of the same subject; for a wildcard pattern the entries below its
literal part (``_INBOX.abc.*`` drops ``_INBOX.abc.…`` only), found through a token trie of
the cached subjects; a pattern starting with ``*``/``>`` clears the cache. Measured here
with 4096 cached subjects: scanning all keys for the prefix cost ~0.8 ms per wildcard
insert (too much when every new connection subscribes ``_INBOX.<id>.*``), clearing the
cache costs ~3 µs per hot subject on its next publish; the trie costs ~1 µs per cache
miss and is proportional to the affected entries on insert/remove.

``match`` returns ``(plain, queues)``: a tuple of items and a dict ``{queue: tuple of
items}``. Both are shared with the cache and with other callers: treat them as read-only.
An item inserted under several matching patterns appears once per insertion; inserting
the same item twice under the same subject and queue counts twice (and needs two removes).
Publish subjects are taken literally: a ``*`` or ``>`` in them is just a token (as in
nats-server, which also delivers nothing for a subject with an empty token).
"""

from __future__ import annotations

_EMPTY: tuple = ((), {})


class _Node:
    __slots__ = ("lit", "pwc", "fwc", "pre", "plain", "queues", "multi")

    def __init__(self) -> None:
        # Children and item sets are created on first use: most nodes of a big trie are
        # leaves that hold one subscription.
        self.lit: dict[str, _Node] | None = None
        self.pwc: _Node | None = None
        self.fwc: _Node | None = None
        self.pre: dict[str, _Node] | None = None
        self.plain: dict | None = None  # item -> insertion count
        self.queues: dict[str, dict] | None = None  # queue -> {item: count}
        self.multi = 0  # entries with count > 1; when 0, dict keys are the items as-is

    def empty(self) -> bool:
        return not (self.lit or self.pwc or self.fwc or self.pre or self.plain or self.queues)


def _extend(out: list, items: dict, multi: int) -> None:
    if not multi:
        out.extend(items)
        return
    for item, count in items.items():
        out.extend((item,) * count)


def _collect(node: _Node, plain: list, queues: dict) -> None:
    if node.plain:
        _extend(plain, node.plain, node.multi)
    if node.queues:
        for q, items in node.queues.items():
            lst = queues.get(q)
            if lst is None:
                queues[q] = lst = []
            _extend(lst, items, node.multi)


def _token_kind(t: str, last: bool) -> int:
    """0 literal, 1 ``*``, 2 ``>``, 3 prefix wildcard."""
    if t == "*":
        return 1
    if t == ">" or (last and t == "#"):
        return 2
    if len(t) > 1 and t[-1] == "*":
        return 3
    return 0


class Sublist:
    __slots__ = ("_root", "_count", "_cache", "_cache_max", "_ctrie")

    def __init__(self, cache_size: int = 4096) -> None:
        self._root = _Node()
        self._count = 0
        self._cache: dict[str, tuple] = {}
        self._cache_max = cache_size
        # The cached subjects again, as nested dicts by token ({token: {...}, None: subject}),
        # so that a wildcard insert/remove finds the entries it affects without a scan.
        self._ctrie: dict = {}

    def __len__(self) -> int:
        return self._count

    def insert(self, subject: str, item, queue: str | None = None) -> None:
        tokens = subject.split(".")
        last = len(tokens) - 1
        node = self._root
        for i, t in enumerate(tokens):
            kind = _token_kind(t, i == last)
            if kind == 0:
                if node.lit is None:
                    node.lit = {}
                child = node.lit.get(t)
                if child is None:
                    node.lit[t] = child = _Node()
            elif kind == 1:
                child = node.pwc
                if child is None:
                    node.pwc = child = _Node()
            elif kind == 2:
                if i != last:
                    raise ValueError(f"invalid subject {subject!r}: '>' must be the last token")
                child = node.fwc
                if child is None:
                    node.fwc = child = _Node()
            else:
                if node.pre is None:
                    node.pre = {}
                child = node.pre.get(t[:-1])
                if child is None:
                    node.pre[t[:-1]] = child = _Node()
            node = child
        if queue is None:
            if node.plain is None:
                node.plain = {}
            items = node.plain
        else:
            if node.queues is None:
                node.queues = {}
            items = node.queues.get(queue)
            if items is None:
                node.queues[queue] = items = {}
        count = items.get(item, 0) + 1
        items[item] = count
        if count == 2:
            node.multi += 1
        self._count += 1
        self._invalidate(subject, tokens)

    def remove(self, subject: str, item, queue: str | None = None) -> bool:
        tokens = subject.split(".")
        last = len(tokens) - 1
        node = self._root
        path: list[tuple[_Node, int, str]] = []
        for i, t in enumerate(tokens):
            kind = _token_kind(t, i == last)
            if kind == 0:
                child = node.lit.get(t) if node.lit is not None else None
            elif kind == 1:
                child = node.pwc
            elif kind == 2:
                child = node.fwc if i == last else None
            else:
                child = node.pre.get(t[:-1]) if node.pre is not None else None
            if child is None:
                return False
            path.append((node, kind, t))
            node = child
        if queue is None:
            items = node.plain
        else:
            items = node.queues.get(queue) if node.queues is not None else None
        if not items:
            return False
        count = items.get(item)
        if count is None:
            return False
        if count == 1:
            del items[item]
            if not items:
                if queue is None:
                    node.plain = None
                else:
                    del node.queues[queue]
                    if not node.queues:
                        node.queues = None
        else:
            items[item] = count - 1
            if count == 2:
                node.multi -= 1
        self._count -= 1
        # Drop nodes left empty so churn of unique subjects does not grow the trie.
        while path and node.empty():
            parent, kind, t = path.pop()
            if kind == 0:
                del parent.lit[t]
                if not parent.lit:
                    parent.lit = None
            elif kind == 1:
                parent.pwc = None
            elif kind == 2:
                parent.fwc = None
            else:
                del parent.pre[t[:-1]]
                if not parent.pre:
                    parent.pre = None
            node = parent
        self._invalidate(subject, tokens)
        return True

    def match(self, subject: str) -> tuple[tuple, dict[str, tuple]]:
        """Items whose pattern matches the publish subject: ``(plain, {queue: items})``."""
        result = self._cache.get(subject)
        if result is not None:
            return result
        tokens = subject.split(".")
        result = self._match(tokens)
        cache = self._cache
        if len(cache) >= self._cache_max:
            # Start over rather than evict one by one: unique subjects (request replies)
            # keep the cache full, and per-entry eviction (unlinking it from the token
            # index) measured as costly as the trie walk itself. A hot subject pays one
            # miss per refill.
            cache.clear()
            self._ctrie.clear()
        cache[subject] = result
        node = self._ctrie
        for t in tokens:
            child = node.get(t)
            if child is None:
                node[t] = child = {}
            node = child
        node[None] = subject
        return result

    def has_interest(self, subject: str) -> bool:
        plain, queues = self.match(subject)
        return bool(plain) or bool(queues)

    def _match(self, tokens: list[str]) -> tuple[tuple, dict[str, tuple]]:
        if "" in tokens:
            return _EMPTY
        plain: list = []
        queues: dict[str, list] = {}
        nodes = [self._root]
        for t in tokens:
            nxt = []
            for node in nodes:
                if node.fwc is not None:
                    _collect(node.fwc, plain, queues)
                if node.lit is not None:
                    child = node.lit.get(t)
                    if child is not None:
                        nxt.append(child)
                if node.pwc is not None:
                    nxt.append(node.pwc)
                if node.pre is not None:
                    for prefix, child in node.pre.items():
                        if t.startswith(prefix):
                            nxt.append(child)
            if not nxt:
                break
            nodes = nxt
        else:
            for node in nodes:
                _collect(node, plain, queues)
        if not plain and not queues:
            return _EMPTY
        return tuple(plain), {q: tuple(items) for q, items in queues.items()}

    def _invalidate(self, subject: str, tokens: list[str]) -> None:
        if not self._cache:
            return
        last = len(tokens) - 1
        for i, t in enumerate(tokens):
            kind = _token_kind(t, i == last)
            if kind:
                break
        else:
            self._uncache(subject)
            return
        if i == 0 and kind != 3:
            self._cache.clear()
            self._ctrie.clear()
            return
        # Only cached subjects below the pattern's literal part can match it.
        cache = self._cache
        node = self._ctrie
        path = []
        for t in tokens[:i]:
            path.append((node, t))
            node = node.get(t)
            if node is None:
                return
        if kind == 3:
            prefix = tokens[i][:-1]
            doomed = [t for t in node if t is not None and t.startswith(prefix)]
        else:
            doomed = [t for t in node if t is not None]
        for t in doomed:
            stack = [node.pop(t)]
            while stack:
                for key, value in stack.pop().items():
                    if key is None:
                        del cache[value]
                    else:
                        stack.append(value)
        self._prune(node, path)

    def _uncache(self, subject: str) -> None:
        if self._cache.pop(subject, None) is None:
            return
        node = self._ctrie
        path = []
        for t in subject.split("."):
            path.append((node, t))
            node = node[t]
        del node[None]
        self._prune(node, path)

    @staticmethod
    def _prune(node: dict, path: list) -> None:
        while path and not node:
            parent, t = path.pop()
            del parent[t]
            node = parent
