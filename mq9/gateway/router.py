"""Plain NATS routing inside one node: local subscribers and the other gateways.

The sublist holds two kinds of items: ``Subscription``s of this gateway's clients and
``RemoteInterest`` records of other gateways (learned from ``Interest`` messages). A publish
is delivered to matching local subscriptions and forwarded once to each gateway with plain
interest; for a queue group, one member is chosen among all gateways, and the gateway that
holds it is told by name in ``Routed.queues`` so it delivers to exactly one of its members.

Interest changes are sent only on a 0 <-> 1 transition of a (subject, queue) pair.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Protocol, final

import msgspec

from mq9 import wire
from mq9.gateway.client import Client, Subscription
from mq9.gateway.sublist import Sublist


class Mesh(Protocol):
    """The other gateways, as the router talks to them (``mq9.gateway.peers.Peers``)."""

    @property
    def others(self) -> list[str]: ...
    def send(self, g: str, msg: wire.PeerMsg) -> None: ...


@final  # so that ``type(item) is RemoteInterest`` tells the two kinds of items apart for mypy
class RemoteInterest:
    __slots__ = ("gw", "subject", "queue", "count")

    def __init__(self, gw: str, subject: str, queue: str | None):
        self.gw = gw
        self.subject = subject
        self.queue = queue
        self.count = 0


Item = Subscription | RemoteInterest  # what the sublist holds


class _Forward(msgspec.Struct):
    """What one publish sends to another gateway: to its plain subscribers or not, and the
    queue groups whose chosen member it holds."""

    plain: bool
    queues: list[str] = []


class Router:
    def __init__(self, gw_id: str, peers: Mesh):
        self.gw = gw_id
        self.peers = peers
        self.sublist: Sublist[Item] = Sublist()
        self.local_counts: dict[tuple[str, str | None], int] = defaultdict(int)
        self.remote: dict[tuple[str, str, str | None], RemoteInterest] = {}

    # ---- local subscriptions ---------------------------------------------------------

    def add_local(self, sub: Subscription) -> None:
        self.sublist.insert(sub.subject, sub, sub.queue)
        key = (sub.subject, sub.queue)
        self.local_counts[key] += 1
        # Plain interest is all-or-nothing; queue interest is a weight (members), so that
        # the sender picks a gateway in proportion to its members.
        if self.local_counts[key] == 1 or sub.queue is not None:
            self._announce(sub.subject, sub.queue, 1)

    def remove_local(self, sub: Subscription) -> None:
        if not self.sublist.remove(sub.subject, sub, sub.queue):
            return
        key = (sub.subject, sub.queue)
        self.local_counts[key] -= 1
        if self.local_counts[key] <= 0:
            del self.local_counts[key]
            self._announce(sub.subject, sub.queue, -1)
        elif sub.queue is not None:
            self._announce(sub.subject, sub.queue, -1)

    def _announce(self, subject: str, queue: str | None, delta: int) -> None:
        msg = wire.Interest(gw=self.gw, subject=subject, queue=queue, delta=delta)
        for g in self.peers.others:
            self.peers.send(g, msg)

    # ---- interest from peers ---------------------------------------------------------

    def on_peer_gone(self, g: str) -> None:
        for key in [k for k in self.remote if k[0] == g]:
            ri = self.remote.pop(key)
            self.sublist.remove(ri.subject, ri, ri.queue)

    def on_peer_hello(self, hello: wire.PeerHello) -> None:
        g = hello.gw
        self.on_peer_gone(g)
        if hello.want:
            self.peers.send(g, wire.PeerHello(gw=self.gw, want=False))
            for (subject, queue), n in self.local_counts.items():
                self.peers.send(g, wire.Interest(gw=self.gw, subject=subject, queue=queue,
                                                 delta=n if queue is not None else 1))

    def on_interest(self, msg: wire.Interest) -> None:
        if msg.delta:
            key = (msg.gw, msg.subject, msg.queue)
            ri = self.remote.get(key)
            if ri is None:
                if msg.delta < 0:
                    return
                ri = self.remote[key] = RemoteInterest(msg.gw, msg.subject, msg.queue)
                self.sublist.insert(msg.subject, ri, msg.queue)
            ri.count += msg.delta
            if ri.count <= 0:
                del self.remote[key]
                self.sublist.remove(ri.subject, ri, ri.queue)

    # ---- publishing ------------------------------------------------------------------

    def route(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
              origin: Client | None) -> bool:
        """Deliver a publish from a local client (``origin`` may be None for messages the
        gateway itself publishes). Returns whether anyone, anywhere, was interested."""
        plain, queues = self.sublist.match(subject)
        if not plain and not queues:
            return False
        delivered = False
        forward: dict[str, _Forward] = {}
        for item in plain:
            if type(item) is Subscription:
                client = item.client
                if client is origin and not client.echo:
                    continue
                client.deliver(item, subject, reply, headers, payload)
                delivered = True
            elif item.gw not in forward:
                forward[item.gw] = _Forward(True)
        if queues:
            delivered = self._to_queues(subject, reply, headers, payload, origin, queues,
                                        forward) or delivered
        for g, spec in forward.items():
            self.peers.send(g, wire.Routed(subject=subject, payload=payload, reply=reply,
                                           headers=headers, plain=spec.plain, queues=spec.queues))
        return delivered or bool(forward)

    def route_run(self, subject: str, reply: str | None, payloads: list[bytes],
                  origin: Client | None) -> bool:
        """``route`` for several header-less messages to one subject, in order: one match,
        one delivery call per subscriber and one ``RoutedRun`` per interested gateway; queue
        groups still choose a member per message."""
        plain, queues = self.sublist.match(subject)
        if not plain and not queues:
            return False
        delivered = False
        gateways: list[str] = []
        for item in plain:
            if type(item) is Subscription:
                client = item.client
                if client is origin and not client.echo:
                    continue
                client.deliver_run(item, subject, reply, payloads)
                delivered = True
            elif item.gw not in gateways:
                gateways.append(item.gw)
        for g in gateways:
            self.peers.send(g, wire.RoutedRun(subject=subject, reply=reply, payloads=payloads))
        if queues:
            for payload in payloads:
                forward: dict[str, _Forward] = {}
                delivered = self._to_queues(subject, reply, None, payload, origin, queues,
                                            forward) or delivered
                for g, spec in forward.items():
                    self.peers.send(g, wire.Routed(subject=subject, payload=payload, reply=reply,
                                                   plain=False, queues=spec.queues))
        return delivered or bool(gateways)

    def _to_queues(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
                   origin: Client | None, queues: Mapping[str, Sequence[Item]],
                   forward: dict[str, _Forward]) -> bool:
        """One member per queue group: a local one gets the message now, another gateway's
        is named in ``forward``. Returns whether a local member got it."""
        delivered = False
        for queue, members in queues.items():
            if origin is not None and not origin.echo:
                members = [m for m in members if type(m) is not Subscription or m.client is not origin]
                if not members:
                    continue
            chosen = _pick(members)
            if type(chosen) is Subscription:
                chosen.client.deliver(chosen, subject, reply, headers, payload)
                delivered = True
            else:
                spec = forward.get(chosen.gw)
                if spec is None:
                    spec = forward[chosen.gw] = _Forward(False)
                spec.queues.append(queue)
        return delivered

    def has_interest(self, subject: str) -> bool:
        """Anyone, on any gateway, subscribed to ``subject`` (cached like ``route``)."""
        plain, queues = self.sublist.match(subject)
        return bool(plain or queues)

    def on_routed(self, msg: wire.Routed) -> None:
        plain, queues = self.sublist.match(msg.subject)

        subject, reply, headers, payload = msg.subject, msg.reply, msg.headers, msg.payload
        if msg.plain:
            for item in plain:
                if type(item) is Subscription:
                    item.client.deliver(item, subject, reply, headers, payload)
        for queue in msg.queues:
            local = [m for m in queues.get(queue, ()) if type(m) is Subscription]
            if local:
                chosen = local[random.randrange(len(local))] if len(local) > 1 else local[0]
                chosen.client.deliver(chosen, subject, reply, headers, payload)

    def on_routed_run(self, msg: wire.RoutedRun) -> None:
        plain, _ = self.sublist.match(msg.subject)
        for item in plain:
            if type(item) is Subscription:
                item.client.deliver_run(item, msg.subject, msg.reply, msg.payloads)

    def no_responders(self, reply: str, status: bytes, client: Client) -> None:
        """The 503 status goes to the requester's first own non-queue subscription that
        matches the reply subject, as nats-server does."""
        plain, _ = self.sublist.match(reply)
        for item in plain:
            if type(item) is Subscription and item.client is client:
                client.deliver(item, reply, None, status, b"")
                return


def _pick(members: Sequence[Item]) -> Item:
    """One member of a queue group; another gateway's interest weighs as many members."""
    if len(members) == 1:
        return members[0]
    total = 0
    for m in members:
        total += m.count if type(m) is RemoteInterest else 1
    r = random.randrange(total)
    for m in members:
        r -= m.count if type(m) is RemoteInterest else 1
        if r < 0:
            return m
    return members[-1]
