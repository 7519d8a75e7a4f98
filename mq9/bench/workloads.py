"""The mailbox workloads, and the primitives they are made of.

Primitives (also used by ``make bench``, ``loadtest/bench.py``, against mq9 and nats-server):

- ``pipelined``: requests with reply subjects keeping N unanswered (acked sends, creates,
  deletes, JetStream publishes), counting the answers ``ok`` accepts;
- ``latencies``: the same one request at a time, timed;
- ``round_trips``: request/reply through the broker to a responder of our own;
- ``create_mailbox`` / ``create_mailboxes`` / ``delete_mailboxes``;
- ``replay``: subscribe to a mailbox with a stored backlog and time its delivery.

Workloads (``mq9 bench``): ``Session`` runs them against one server and deletes every
mailbox it created, whatever happens. Each returns ``Row``s: what was done, how many, how
long, and latency percentiles where they apply. A workload that cannot finish raises
``WorkloadError`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict, TypeVar

from mq9.bench import rawnats as rn

CREATE = "$mq9.AI.MAILBOX.CREATE"
WORKLOADS = ("mailboxes", "acked", "replay", "rr")
MAILBOX_CONNS = 8      # connections creating mailboxes (spread over a node's gateway processes)


class WorkloadError(Exception):
    """A workload could not finish; the text says why."""


class NotMq9(WorkloadError):
    """The server does not answer mailbox requests: it is not mq9."""


T = TypeVar("T")


class Pipeline(TypedDict):
    """A pipelined run's counters (a dict: the reply callback bumps them per answer)."""

    n: int  # may drop to what was sent: a cancelled run stops sending but waits for its answers
    sent: int
    done: int
    ok: int
    err: int
    first_err: bytes
    t0: float  # perf_counter
    t_end: float
    secs: float
    timeout: NotRequired[bool]  # cut short by the deadline or a closed connection


class Created(TypedDict):
    made: int
    err: int
    first_err: bytes
    secs: float


class Deleted(TypedDict):
    deleted: int
    err: int
    first_err: bytes
    secs: float


class Shortfall(TypedDict):
    """A one-at-a-time run's answers, for ``failure``."""

    ok: int
    err: int
    first_err: bytes


class _Deleting(TypedDict):
    ok: int
    err: int
    first_err: bytes
    next: int
    live: int
    t0: float
    t_end: float


class Meter:
    """What is being done now and how far it got, for a progress display that polls it (so
    counting costs the hot paths one addition)."""

    def __init__(self) -> None:
        self.what = ""
        self.total = 0
        self.count = 0
        self.started = time.monotonic()
        self._read: Callable[[], int] | None = None

    def stage(self, what: str, total: int, read: Callable[[], int] | None = None) -> None:
        self.what, self.total, self.count, self._read = what, total, 0, read
        self.started = time.monotonic()

    @property
    def done(self) -> int:
        return self._read() if self._read is not None else self.count


async def gather_all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that, when cancelled, returns only once every one has finished
    (plain gather gives up at the first one that ends cancelled, while the others may still
    be collecting answers for cleanup); the first failure is raised."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    out: list[T] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


def pct(sorted_ns: list[int], q: float) -> float:
    """Percentile of sorted nanosecond samples, in microseconds (nearest rank)."""
    if not sorted_ns:
        return float("nan")
    i = min(len(sorted_ns) - 1, max(0, int(round(q * len(sorted_ns) + 0.5)) - 1))
    return sorted_ns[i] / 1000.0


def is_sent(body: bytes) -> bool:
    """An mq9 send's ack."""
    return b'"msg_id"' in body and b'"error"' not in body


def is_created(body: bytes) -> bool:
    return b'"mail_id"' in body and b'"error"' not in body


def is_ok(body: bytes) -> bool:
    return bool(body) and b'"error"' not in body


def inbox(mail_id: str, priority: str = "normal") -> str:
    return f"$mq9.AI.INBOX.{mail_id}.{priority}"


# ---------------------------------------------------------------------------- primitives


async def pipelined(nc: rn.Client, n: int, inflight: int, deadline: float,
                    ok: Callable[[bytes], bool], *, subject: str | bytes = b"",
                    payload: bytes = b"",
                    message: Callable[[int], tuple[bytes, bytes]] | None = None,
                    keep: list[bytes] | None = None, meter: Meter | None = None) -> Pipeline:
    """Send ``n`` requests keeping ``inflight`` unanswered, to ``subject`` or, if given,
    ``message(i) -> (subject, payload)``; count answers ``ok(body)`` accepts (their bodies
    go to ``keep`` when given). Returns ``sent``, ``done``, ``ok``, ``err``, ``first_err``,
    ``t0``/``t_end`` (perf_counter), ``secs`` and ``timeout`` when the deadline or a closed
    connection cut it short."""
    loop = asyncio.get_running_loop()
    done_fut: asyncio.Future[None] = loop.create_future()
    st: Pipeline = {"n": n, "sent": 0, "done": 0, "ok": 0, "err": 0, "first_err": b"",
                    "t0": 0.0, "t_end": 0.0, "secs": 0.0}
    subj = subject if isinstance(subject, bytes) else subject.encode()

    def on_reply(headers: bytes | None, body: bytes) -> None:
        st["done"] += 1
        if meter is not None:
            meter.count += 1
        if ok(body):
            st["ok"] += 1
            if keep is not None:
                keep.append(body)
        else:
            st["err"] += 1
            if not st["first_err"]:
                st["first_err"] = (headers or b"") + body[:300]
        if st["sent"] < st["n"]:
            send_one()
        if st["done"] >= st["n"]:
            st["t_end"] = time.perf_counter()
            if not done_fut.done():
                done_fut.set_result(None)

    if message is None:
        def send_one() -> None:
            st["sent"] += 1
            nc.publish(subj, payload, nc.new_reply(on_reply))
    else:
        def send_one() -> None:
            s, p = message(st["sent"])
            st["sent"] += 1
            nc.publish(s, p, nc.new_reply(on_reply))

    t0 = st["t0"] = time.perf_counter()
    for _ in range(min(inflight, n)):
        send_one()
    if n <= 0:
        done_fut.set_result(None)
    remaining = deadline - time.monotonic()
    either: list[asyncio.Future[Any]] = [done_fut, nc._closed]
    try:
        done, _ = await asyncio.wait(either, timeout=max(0.1, remaining),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # What is in flight still gets its answer: a CREATE's answer is the only place
        # its mailbox's token exists, so leaving now would leave mailboxes nobody can delete.
        st["n"] = st["sent"]
        if st["done"] < st["n"]:
            await asyncio.wait(either, timeout=10.0,
                               return_when=asyncio.FIRST_COMPLETED)
        raise
    if done_fut not in done:
        st["t_end"] = time.perf_counter()
        st["timeout"] = True
    st["secs"] = st["t_end"] - t0
    return st


async def latencies(nc: rn.Client, subject: str, payload: bytes, n: int, deadline: float,
                    ok: Callable[[bytes], bool], meter: Meter | None = None
                    ) -> tuple[list[int], int, bytes]:
    """``n`` requests one at a time: sorted round trips (ns), errors, the first error."""
    lat: list[int] = []
    errors = 0
    first_err = b""
    subj = subject.encode()
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter_ns()
        try:
            r = await nc.request(subj, payload, timeout=5.0)
        except (TimeoutError, rn.NatsError) as e:
            errors += 1
            first_err = first_err or str(e).encode()
            continue
        if meter is not None:
            meter.count += 1
        if not ok(r.payload):
            errors += 1
            first_err = first_err or (r.headers or b"") + r.payload[:300]
            continue
        lat.append(time.perf_counter_ns() - t)
    lat.sort()
    return lat, errors, first_err


async def round_trips(responder: rn.Client, requester: rn.Client, subject: str,
                      payload: bytes, n: int, deadline: float, meter: Meter | None = None
                      ) -> tuple[list[int], int]:
    """Request/reply through the broker to a responder on ``responder``: sorted round trips
    (ns) after a warm-up, and the number that failed or came back wrong."""
    def on_req(subject: bytes, reply: bytes | None, headers: bytes | None, body: bytes) -> None:
        if reply:
            responder.publish(reply, body)

    sub = responder.subscribe(subject, cb=on_req)
    try:
        await responder.flush()
        await requester.flush()
        for _ in range(min(200, n)):  # warm-up
            await requester.request(subject, payload, timeout=5.0)
        lat: list[int] = []
        errors = 0
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter_ns()
            try:
                r = await requester.request(subject, payload, timeout=5.0)
            except (TimeoutError, rn.NatsError):
                errors += 1
                continue
            lat.append(time.perf_counter_ns() - t)
            if meter is not None:
                meter.count += 1
            if r.payload != payload:
                errors += 1
        lat.sort()
        return lat, errors
    finally:
        if not responder.is_closed:
            sub.unsubscribe()


async def create_mailbox(nc: rn.Client, ttl: int, timeout: float = 5.0) -> tuple[str, str]:
    """A standard mailbox: (mail_id, token). ``NotMq9`` when nobody answers CREATE."""
    try:
        r = await nc.request(CREATE, json.dumps({"type": "standard", "ttl": ttl}).encode(),
                             timeout)
    except rn.NoResponders:
        raise NotMq9(f"nobody answers {CREATE}") from None
    except TimeoutError:
        raise WorkloadError(f"no answer to {CREATE} within {timeout:g}s") from None
    try:
        body = r.json()
        mail_id, token = body["mail_id"], body["token"]
        if not isinstance(mail_id, str) or not isinstance(token, str):
            raise TypeError
        return mail_id, token
    except (ValueError, KeyError, TypeError):
        raise WorkloadError(f"mailbox create: {r.payload[:300]!r}") from None


async def create_mailboxes(conns: list[rn.Client], n: int, inflight: int, deadline: float,
                           ttl: int, keep: list[bytes] | None = None,
                           meter: Meter | None = None) -> Created:
    """``n`` CREATE requests spread over ``conns``, ``inflight`` unanswered on each: ``made``,
    ``err``, ``first_err``, ``secs`` (first send to last answer)."""
    body = json.dumps({"ttl": ttl}).encode()
    per = [n // len(conns) + (i < n % len(conns)) for i in range(len(conns))]
    sts = await gather_all(
        pipelined(nc, k, inflight, deadline, is_created, subject=CREATE, payload=body,
                  keep=keep, meter=meter)
        for nc, k in zip(conns, per))
    return {"made": sum(st["ok"] for st in sts), "err": sum(st["err"] for st in sts),
            "first_err": next((st["first_err"] for st in sts if st["first_err"]), b""),
            "secs": max(st["t_end"] for st in sts) - min(st["t0"] for st in sts)}


async def delete_mailboxes(conns: list[rn.Client], boxes: list[tuple[str, str]],
                           inflight: int, deadline: float, meter: Meter | None = None,
                           deleted: list[bytes] | None = None) -> Deleted:
    """DELETE every (mail_id, token) of ``boxes``, ``inflight`` at a time on each of
    ``conns``: ``deleted``, ``err``, ``first_err``, ``secs``; ``deleted`` (a list) collects
    the mail_ids whose DELETE was answered without an error."""
    shares = [boxes[i::len(conns)] for i in range(len(conns))]

    async def one(nc: rn.Client, share: list[tuple[str, str]]) -> _Deleting:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        st: _Deleting = {"ok": 0, "err": 0, "first_err": b"", "next": 0, "live": 0,
              "t0": time.perf_counter(), "t_end": time.perf_counter()}
        gone: list[bytes] = []

        def send_one() -> None:
            mail_id, token = share[st["next"]]
            st["next"] += 1
            st["live"] += 1

            def on_reply(headers: bytes | None, body: bytes) -> None:
                st["live"] -= 1
                if meter is not None:
                    meter.count += 1
                # not_found: gone already (a run interrupted after the DELETE went out)
                if is_ok(body) or b'"not_found"' in body:
                    st["ok"] += 1
                    gone.append(mail_id.encode())
                else:
                    st["err"] += 1
                    st["first_err"] = st["first_err"] or (headers or b"") + body[:300]
                if st["next"] < len(share):
                    send_one()
                elif st["live"] == 0 and not fut.done():
                    st["t_end"] = time.perf_counter()
                    fut.set_result(None)

            nc.publish(b"$mq9.AI.MAILBOX.DELETE." + mail_id.encode(),
                       json.dumps({"token": token}).encode(), nc.new_reply(on_reply))

        try:
            for _ in range(min(inflight, len(share))):
                send_one()
            if share:
                either: list[asyncio.Future[Any]] = [fut, nc._closed]
                await asyncio.wait(either,
                                   timeout=max(0.1, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled: what is gone is gone
            if deleted is not None:
                deleted.extend(gone)
        return st

    sts = await gather_all(one(nc, share) for nc, share in zip(conns, shares))
    return {"deleted": sum(st["ok"] for st in sts), "err": sum(st["err"] for st in sts),
            "first_err": next((st["first_err"] for st in sts if st["first_err"]), b""),
            "secs": max(st["t_end"] for st in sts) - min(st["t0"] for st in sts)}


async def replay(nc: rn.Client, mail_id: str, n: int, deadline: float,
                 meter: Meter | None = None) -> float:
    """Subscribe as the owner of a mailbox holding ``n`` undelivered messages; seconds from
    the SUB to the last one received."""
    t0 = time.perf_counter()
    sub = nc.subscribe(f"$mq9.AI.INBOX.{mail_id}.*", target=n)
    if meter is not None:
        meter.stage(meter.what, n, lambda: sub.count)
    if not await sub.wait(max(0.1, deadline - time.monotonic())):
        raise WorkloadError(f"{sub.count}/{n} replayed before the deadline"
                            + (f" ({nc.errors[-1]})" if nc.errors else ""))
    await nc.flush()  # anything beyond n would be a duplicate
    if sub.count != n:
        raise WorkloadError(f"{sub.count} delivered for {n} stored")
    return sub.last - t0


def failure(what: str, st: Pipeline | Created | Deleted | Shortfall, n: int,
            count_flag: str = "--messages") -> str:
    """Why a pipelined run fell short, in one line."""
    counts: Mapping[str, object] = st
    first_err = st["first_err"]
    why = f"{what}: {counts.get('ok', counts.get('made', counts.get('deleted', 0)))}/{n} answered"
    if st["err"]:
        why += f", {st['err']} errors, the first: {_answer_text(first_err)}"
    if counts.get("timeout") and not st["err"]:
        why += " before the time limit"
    if b'"code":"full"' in first_err.replace(b" ", b""):
        why += f" (the server's max_msgs is lower than {count_flag})"
    return why


def _answer_text(raw: bytes) -> str:
    """An error answer for people: an mq9 error's text, else the bytes, shortened."""
    try:
        text = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace")
    text = " ".join(str(text).split())
    return text if len(text) <= 160 else text[:159] + "…"


# ---------------------------------------------------------------------------- workloads


@dataclass
class Plan:
    messages: int = 10_000        # acked sends pipelined; messages stored then replayed
    size: int = 256               # payload bytes
    inflight: int = 1_000         # requests unanswered at a time (per connection)
    mailboxes: int = 10_000       # mailboxes created then deleted
    samples: int = 1_000          # one-at-a-time round trips for latencies
    time_limit: float = 120.0     # seconds one workload may take

    @property
    def ttl(self) -> int:
        """Lifetime of the mailboxes a run creates: enough for the run, short enough that
        a run killed before it could delete them leaves nothing for long."""
        return int(self.time_limit) + 600


@dataclass
class Row:
    workload: str
    name: str
    operations: int
    seconds: float
    unit: str = "ops/s"
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"workload": self.workload, "name": self.name, "operations": self.operations,
                "seconds": round(self.seconds, 6), "rate": round(self.rate, 1),
                "unit": self.unit, "p50_us": _round(self.p50_us), "p99_us": _round(self.p99_us)}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


Connect = Callable[[str], Awaitable[rn.Client]]


@dataclass
class Session:
    """Workloads against one server. ``connect(name)`` opens a connection to it. Every
    mailbox created is in ``alive`` until deleted; ``cleanup`` deletes what is left."""

    connect: Connect
    plan: Plan
    meter: Meter = field(default_factory=Meter)
    alive: dict[str, str] = field(default_factory=dict)     # mail_id -> token
    created: int = 0
    deleted: int = 0

    async def run(self, name: str) -> list[Row]:
        deadline = time.monotonic() + self.plan.time_limit
        fn = {"mailboxes": self.mailboxes, "acked": self.acked, "replay": self.replay,
              "rr": self.rr}[name]
        return await fn(deadline)

    async def _conns(self, names: list[str]) -> list[rn.Client]:
        got = await asyncio.gather(*(self.connect(n) for n in names), return_exceptions=True)
        ok = [c for c in got if not isinstance(c, BaseException)]
        bad = [c for c in got if isinstance(c, BaseException)]
        if bad:  # none left open behind a failure
            await close_all(ok)
            raise bad[0]
        return ok

    async def _mailbox(self, nc: rn.Client) -> str:
        task = asyncio.ensure_future(create_mailbox(nc, self.plan.ttl))
        try:
            mail_id, token = await asyncio.shield(task)
        except asyncio.CancelledError:
            # the CREATE is out: keep its answer (the token) so that cleanup can delete it
            with contextlib.suppress(Exception, asyncio.CancelledError):
                mail_id, token = await asyncio.wait_for(task, 10.0)
                self.alive[mail_id] = token
                self.created += 1
            raise
        self.alive[mail_id] = token
        self.created += 1
        return mail_id

    async def _delete(self, conns: list[rn.Client], mail_ids: list[str],
                      deadline: float) -> Deleted:
        boxes = [(m, self.alive[m]) for m in mail_ids if m in self.alive]
        gone: list[bytes] = []
        try:
            return await delete_mailboxes(conns, boxes, self.plan.inflight, deadline,
                                          self.meter, gone)
        finally:
            for m in gone:
                if self.alive.pop(m.decode(), None) is not None:
                    self.deleted += 1

    async def check_mq9(self, nc: rn.Client) -> None:
        """Create and delete a mailbox: ``NotMq9`` if nobody answers."""
        mail_id = await self._mailbox(nc)
        await self._delete([nc], [mail_id], time.monotonic() + 10.0)

    async def cleanup(self, timeout: float = 30.0) -> int:
        """Delete every mailbox still alive; how many could not be deleted."""
        if not self.alive:
            return 0
        conns = await self._conns([f"bench-cleanup{i}" for i in
                                   range(min(MAILBOX_CONNS, len(self.alive)))])
        try:
            self.meter.stage("cleanup", len(self.alive))
            await self._delete(conns, list(self.alive), time.monotonic() + timeout)
        finally:
            await close_all(conns)
        return len(self.alive)

    # -- the workloads --------------------------------------------------------------------

    async def mailboxes(self, deadline: float) -> list[Row]:
        """Create ``plan.mailboxes`` mailboxes, ``inflight`` at a time on each of
        ``MAILBOX_CONNS`` connections, then delete them the same way."""
        n = self.plan.mailboxes
        conns = await self._conns([f"bench-mkbox{i}" for i in range(min(MAILBOX_CONNS, n))])
        try:
            bodies: list[bytes] = []
            ids = []
            self.meter.stage("create mailboxes", n)
            try:
                st = await create_mailboxes(conns, n, self.plan.inflight, deadline,
                                            self.plan.ttl, keep=bodies, meter=self.meter)
            finally:  # also when cancelled, so that cleanup finds them
                for b in bodies:
                    body = json.loads(b)
                    self.alive[body["mail_id"]] = body["token"]
                    ids.append(body["mail_id"])
                self.created += len(ids)
            if st["made"] < n:
                raise WorkloadError(failure("create", st, n))
            self.meter.stage("delete mailboxes", n)
            dt = await self._delete(conns, ids, deadline)
            if dt["deleted"] < n:
                raise WorkloadError(failure("delete", dt, n))
        finally:
            await close_all(conns)
        return [Row("mailboxes", "create", n, st["secs"], "created/s"),
                Row("mailboxes", "delete", n, dt["secs"], "deleted/s")]

    async def acked(self, deadline: float) -> list[Row]:
        """Sends with a reply subject (the broker acks once the message is stored):
        ``plan.messages`` with ``inflight`` unanswered, then ``plan.samples`` one at a time.
        Each phase has its own mailbox, so no mailbox holds more than ``plan.messages``."""
        p = self.plan
        payload = b"a" * p.size
        nc = await self.connect("bench-acked")
        try:
            warm = await self._mailbox(nc)
            k = min(1_000, p.messages)
            self.meter.stage("acked: warm-up", k)
            st = await pipelined(nc, k, p.inflight, deadline, is_sent, subject=inbox(warm),
                                 payload=payload, meter=self.meter)
            if st["ok"] < k:
                raise WorkloadError(failure("warm-up", st, k))
            await self._delete([nc], [warm], deadline)
            box = await self._mailbox(nc)
            self.meter.stage(f"acked: {p.inflight} in flight", p.messages)
            st = await pipelined(nc, p.messages, p.inflight, deadline, is_sent,
                                 subject=inbox(box), payload=payload, meter=self.meter)
            if st["ok"] < p.messages:
                raise WorkloadError(failure("acked sends", st, p.messages))
            await self._delete([nc], [box], deadline)
            box = await self._mailbox(nc)
            self.meter.stage("acked: 1 in flight", p.samples)
            lat, errors, first = await latencies(nc, inbox(box), payload, p.samples, deadline,
                                                 is_sent, self.meter)
            if errors or len(lat) < p.samples:
                short: Shortfall = {"ok": len(lat), "err": errors, "first_err": first}
                raise WorkloadError(failure("1 in flight", short,
                                            p.samples, "--samples"))
            await self._delete([nc], [box], deadline)
        finally:
            await nc.close()
        return [Row("acked", f"send {p.size} B, {p.inflight} in flight", p.messages,
                    st["secs"], "acks/s"),
                # one at a time: the rate is over the samples' own time
                Row("acked", f"send {p.size} B, 1 in flight", p.samples, sum(lat) / 1e9,
                    "acks/s", pct(lat, 0.50), pct(lat, 0.99))]

    async def replay(self, deadline: float) -> list[Row]:
        """Store ``plan.messages`` in a mailbox nobody reads, then subscribe as its owner
        and time until all are delivered."""
        p = self.plan
        nc = await self.connect("bench-replay-store")
        try:
            box = await self._mailbox(nc)
            self.meter.stage("replay: store", p.messages)
            st = await pipelined(nc, p.messages, p.inflight, deadline, is_sent,
                                 subject=inbox(box), payload=b"p" * p.size, meter=self.meter)
            if st["ok"] < p.messages:
                raise WorkloadError(failure("storing", st, p.messages))
            owner = await self.connect("bench-replay-owner")
            try:
                self.meter.stage("replay: deliver", p.messages)
                secs = await replay(owner, box, p.messages, deadline, self.meter)
            finally:
                await owner.close()
            await self._delete([nc], [box], deadline)
        finally:
            await nc.close()
        return [Row("replay", f"store {p.size} B, {p.inflight} in flight", p.messages,
                    st["secs"], "acks/s"),
                Row("replay", f"deliver {p.messages:,} stored", p.messages, secs, "msgs/s")]

    async def rr(self, deadline: float) -> list[Row]:
        """Request/reply round trips through the broker, one at a time, to a responder on
        another connection (a subject of this run's own)."""
        p = self.plan
        responder, requester = await self._conns(["bench-responder", "bench-requester"])
        try:
            self.meter.stage("request/reply", p.samples)
            subject = f"mq9bench.{os.urandom(6).hex()}.rr"
            lat, errors = await round_trips(responder, requester, subject, b"r" * p.size,
                                            p.samples, deadline, self.meter)
        finally:
            await close_all([responder, requester])
        if errors or len(lat) < p.samples:
            raise WorkloadError(f"{len(lat)}/{p.samples} round trips, {errors} errors")
        # the rate of one-at-a-time phases is over the samples' own time (no warm-up)
        return [Row("rr", f"request/reply {p.size} B, 1 in flight", p.samples, sum(lat) / 1e9,
                    "round trips/s", pct(lat, 0.50), pct(lat, 0.99))]


async def close_all(conns: Iterable[rn.Client]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
