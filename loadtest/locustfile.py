"""locust scenarios for mq9, over NATS (``make loadtest``).

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s \\
           --host nats://127.0.0.1:4222 --only-summary

``python -m loadtest.run_locust`` (what ``make loadtest`` runs) starts a throwaway node on
free 127.0.0.1 ports and runs this file against it. Every operation is reported through
locust's request event (request_type ``NATS``), so the usual statistics, CSV/HTML/JSON
reports and ``--exit-code-on-error`` work. The client is ``loadtest.gnats``, a small
blocking NATS client on gevent sockets (nats-py is asyncio and does not mix with gevent).

Users (weights 3 : 1 : 1):

- ``AgentUser`` — an agent with a mailbox (``$mq9.AI.MAILBOX.CREATE``). It sends acked
  messages (request on ``$mq9.AI.INBOX.{id}.normal``) to other agents' mailboxes, found
  through the module-level ``MAILBOXES`` registry (all users of one locust process share
  it), receives its own on the owner subscription ``$mq9.AI.INBOX.{id}.*``, asks
  ``$mq9.AI.MAILBOX.QUERY.{id}`` with its token, and now and then goes offline (UNSUB,
  flush, close the connection), stays away 1–3 s while the others keep sending, comes back
  (reconnect + owner subscription) and measures the replay of every acknowledged message
  it had not received yet.
  Names: ``mailbox.create``, ``inbox.send (acked)``, ``inbox.deliver (live)`` (send → owner
  latency), ``mailbox.query``, ``agent.offline``, ``agent.reconnect``, ``inbox.replay``
  (SUB → last missed message; length = messages replayed), failures ``inbox.lost``
  (acked but not delivered to an online owner within 5 s, or missing from a replay) and
  ``inbox.duplicate``.
- ``BroadcastUser`` — the guide's competing workers: publishes tasks on
  ``$mq9.AI.BROADCAST.task.available`` and is at the same time a worker in queue group
  ``task-workers``; the worker that gets a task counts it and sends the result to the
  publisher's mailbox. Names: ``broadcast.publish`` (publish + PING/PONG),
  ``broadcast.task→result`` (publish → result in the publisher's mailbox), failures
  ``broadcast.task lost`` (no result within 10 s) and ``broadcast.task duplicate``.
- ``RequestReplyUser`` — a responder on ``agents.echo`` (queue group ``echo``) and requests
  to it (``request agents.echo``), plus requests nobody answers, which must come back as
  no-responders status messages at once (``request (no responders)``).

At the end a line ``mq9 locust:`` logs the counters (tasks per worker, replays, losses).
The loss and duplicate checks assume one locust process (the default); with
``--processes`` the broadcast results still come back, the agent checks are per process.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass, field

import gevent
import gevent.event
from locust import User, between, events, task

try:
    from loadtest.gnats import Client, Msg, NatsError, NoResponders
except ImportError:  # locust puts this file's directory, not the repo, on sys.path
    from gnats import Client, Msg, NatsError, NoResponders

log = logging.getLogger("mq9.locust")

DEFAULT_HOST = "nats://127.0.0.1:4222"
REQUEST_TIMEOUT = float(os.environ.get("MQ9_LOCUST_TIMEOUT", "5"))
MAILBOX_TTL = 3600              # seconds; mailboxes are deleted by their agent on stop
LOST_AFTER = 5.0                # an online owner gets an acked message within this
REPLAY_TIMEOUT = 10.0
TASK_LOST_AFTER = 10.0
OFFLINE_SECONDS = (1.0, 3.0)
TASK_SUBJECT = "$mq9.AI.BROADCAST.task.available"
TASK_QUEUE = "task-workers"
ECHO_SUBJECT = "agents.echo"

COUNTERS: collections.Counter = collections.Counter()
TASKS_BY_WORKER: collections.Counter = collections.Counter()


class Mq9Error(Exception):
    """A JSON error reply ``{"error", "code"}`` or a reply that isn't what was expected."""


@dataclass
class Mailbox:
    mail_id: str
    token: str
    online: bool = False
    online_since: float = 0.0
    # acked to a sender, not yet delivered to the owner: msg_id -> when the ack came back
    outstanding: dict[int, float] = field(default_factory=dict)
    delivered: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)

    def acked(self, msg_id: int) -> None:
        if msg_id not in self.delivered:
            self.outstanding[msg_id] = time.monotonic()

    def delivered_now(self, msg_id: int) -> bool:
        """False for a duplicate."""
        if msg_id in self.delivered:
            return False
        self.delivered.add(msg_id)
        self.outstanding.pop(msg_id, None)
        return True


# Every AgentUser's mailbox, so agents can find each other (one locust process).
MAILBOXES: dict[str, Mailbox] = {}


def _reply_json(msg: Msg) -> dict:
    try:
        body = json.loads(msg.data)
    except ValueError:
        raise Mq9Error(f"reply is not JSON: {msg.data[:100]!r}") from None
    if isinstance(body, dict) and "error" in body:
        raise Mq9Error(f"{body.get('code')}: {body.get('error')}")
    return body


class NatsUser(User):
    abstract = True
    host = DEFAULT_HOST
    _ids = itertools.count(1)

    def __init__(self, environment):
        super().__init__(environment)
        self.uid = f"{type(self).__name__}-{next(NatsUser._ids)}"
        self.nc: Client | None = None

    # ---- reporting ----------------------------------------------------------------------

    def fire(self, name: str, start: float, length: int = 0,
             exc: BaseException | None = None, ms: float | None = None) -> None:
        self.environment.events.request.fire(
            request_type="NATS", name=name,
            response_time=ms if ms is not None else (time.perf_counter() - start) * 1000,
            response_length=length, exception=exc, context={"user": self.uid})

    def fail(self, name: str, text: str) -> None:
        self.fire(name, time.perf_counter(), exc=Mq9Error(text), ms=0)

    def request_json(self, name: str, subject: str, body: dict) -> dict | None:
        """A measured request with a JSON body and a JSON reply; None when it failed (the
        failure is reported)."""
        t0 = time.perf_counter()
        try:
            msg = self.nc.request(subject, json.dumps(body).encode(), timeout=REQUEST_TIMEOUT)
            reply = _reply_json(msg)
        except (NatsError, Mq9Error) as e:
            self.fire(name, t0, exc=e)
            return None
        self.fire(name, t0, length=len(msg.data))
        return reply

    # ---- connection ---------------------------------------------------------------------

    def connect(self, name: str = "connect") -> bool:
        t0 = time.perf_counter()
        try:
            self.nc = Client(self.host or DEFAULT_HOST, name=self.uid,
                             connect_timeout=REQUEST_TIMEOUT).connect()
        except (NatsError, OSError) as e:
            self.nc = None
            self.fire(name, t0, exc=e)
            return False
        self.fire(name, t0)
        return True

    def connected(self) -> bool:
        """Reconnects (and re-subscribes) a connection the server closed."""
        if self.nc is not None and not self.nc.closed:
            return True
        if self.nc is not None:
            COUNTERS["connections lost"] += 1
            log.warning("%s: connection lost (%s), reconnecting", self.uid,
                        self.nc.close_reason)
        if not self.connect("reconnect"):
            gevent.sleep(0.5)
            return False
        self.resubscribe()
        return True

    def resubscribe(self) -> None:
        pass

    def close(self) -> None:
        if self.nc is not None:
            self.nc.close()

    def create_mailbox(self) -> dict | None:
        return self.request_json("mailbox.create", "$mq9.AI.MAILBOX.CREATE",
                                 {"type": "standard", "ttl": MAILBOX_TTL})

    def delete_mailbox(self, mail_id: str, token: str) -> None:
        try:
            self.nc.request(f"$mq9.AI.MAILBOX.DELETE.{mail_id}",
                            json.dumps({"token": token}).encode(), timeout=1.0)
        except (NatsError, AttributeError):
            pass


# ---------------------------------------------------------------------------- agents


class AgentUser(NatsUser):
    """Creates a mailbox, sends acked messages to other agents, goes offline and comes
    back to a replay of what it missed."""

    weight = 3
    wait_time = between(0.1, 0.5)

    def __init__(self, environment):
        super().__init__(environment)
        self.box: Mailbox | None = None
        self.owner_sid: int | None = None
        self.replay_wait: set[int] = set()
        self.replay_done = gevent.event.Event()
        self.replay_last = 0.0
        self.sent = 0

    def on_start(self) -> None:
        if not self.connect():
            raise RuntimeError(f"cannot connect to {self.host}")
        reply = self.create_mailbox()
        if reply is None:
            raise RuntimeError("mailbox.create failed")
        self.box = Mailbox(reply["mail_id"], reply["token"])
        self.subscribe_owner()
        MAILBOXES[self.box.mail_id] = self.box

    def on_stop(self) -> None:
        if self.box is not None:
            MAILBOXES.pop(self.box.mail_id, None)
            if self.nc is not None and not self.nc.closed:
                self.delete_mailbox(self.box.mail_id, self.box.token)
        self.close()

    def subscribe_owner(self) -> None:
        self.owner_sid = self.nc.subscribe(f"$mq9.AI.INBOX.{self.box.mail_id}.*", self.on_inbox)
        self.box.online = True
        self.box.online_since = time.monotonic()

    def resubscribe(self) -> None:
        self.subscribe_owner()

    def on_inbox(self, msg: Msg) -> None:
        try:
            msg_id = int(msg.headers["Mq9-Msg-Id"])
        except (KeyError, ValueError):
            self.fail("inbox.deliver (live)", f"no Mq9-Msg-Id header on {msg.subject}")
            return
        if not self.box.delivered_now(msg_id):
            COUNTERS["inbox duplicates"] += 1
            self.fail("inbox.duplicate", f"msg_id {msg_id} delivered twice to {self.box.mail_id}")
            return
        if msg_id in self.box.lost:
            self.box.lost.discard(msg_id)
            COUNTERS["inbox late (reported lost before)"] += 1
        COUNTERS["inbox delivered"] += 1
        if msg_id in self.replay_wait:
            self.replay_wait.discard(msg_id)
            self.replay_last = time.perf_counter()
            if not self.replay_wait:
                self.replay_done.set()
            return
        try:
            sent_at = json.loads(msg.data)["sent_at"]
        except (ValueError, KeyError, TypeError):
            return
        self.fire("inbox.deliver (live)", 0, length=len(msg.data),
                  ms=max(0.0, (time.time() - sent_at) * 1000))

    def check_lost(self) -> None:
        """Acked messages an online owner has not had for LOST_AFTER seconds."""
        box = self.box
        if box is None or not box.online:
            return
        limit = time.monotonic() - LOST_AFTER
        if box.online_since > limit:
            return
        for msg_id, acked_at in list(box.outstanding.items()):
            if acked_at < limit and msg_id not in self.replay_wait:
                del box.outstanding[msg_id]
                box.lost.add(msg_id)
                COUNTERS["inbox lost"] += 1
                self.fail("inbox.lost", f"acked but not delivered to an online owner within "
                                        f"{LOST_AFTER}s ({self.where({msg_id})})")

    def where(self, missing: set[int]) -> str:
        """For a failure message: are the missing messages still stored undelivered
        (QUERY lists them) or has the broker counted them as delivered?"""
        try:
            reply = _reply_json(self.nc.request(
                f"$mq9.AI.MAILBOX.QUERY.{self.box.mail_id}",
                json.dumps({"token": self.box.token, "limit": 1000}).encode(),
                timeout=REQUEST_TIMEOUT))
            unread = {m.get("msg_id") for m in reply.get("messages", [])}
        except (NatsError, Mq9Error) as e:
            return f"QUERY failed: {e}"
        stored = sorted(missing & unread)
        gone = sorted(missing - unread)
        return (f"mailbox {self.box.mail_id}: msg_ids {stored} still stored undelivered, "
                f"{gone} not listed by QUERY (counted as delivered)")

    @task(6)
    def send(self) -> None:
        if not self.connected():
            return
        self.check_lost()
        others = [b for m, b in MAILBOXES.items() if m != self.box.mail_id] or [self.box]
        target = random.choice(others)
        self.sent += 1
        body = {"from": self.box.mail_id, "type": "task",
                "correlation_id": f"{self.uid}-{self.sent}",
                "reply_to": f"$mq9.AI.INBOX.{self.box.mail_id}.normal",
                "payload": {"data": secrets.token_hex(32)}, "sent_at": time.time()}
        t0 = time.perf_counter()
        subject = f"$mq9.AI.INBOX.{target.mail_id}.normal"
        try:
            msg = self.nc.request(subject, json.dumps(body).encode(), timeout=REQUEST_TIMEOUT)
            reply = _reply_json(msg)
            msg_id = int(reply["msg_id"])
        except Mq9Error as e:
            if str(e).startswith("not_found") and target.mail_id not in MAILBOXES:
                return  # its agent stopped and deleted it meanwhile
            self.fire("inbox.send (acked)", t0, exc=e)
            return
        except (NatsError, KeyError, ValueError, TypeError) as e:
            self.fire("inbox.send (acked)", t0, exc=e)
            return
        self.fire("inbox.send (acked)", t0, length=len(msg.data))
        COUNTERS["inbox acked"] += 1
        target.acked(msg_id)

    @task(1)
    def query(self) -> None:
        if not self.connected():
            return
        reply = self.request_json("mailbox.query", f"$mq9.AI.MAILBOX.QUERY.{self.box.mail_id}",
                                  {"token": self.box.token, "limit": 10})
        if reply is not None and not isinstance(reply.get("unread"), int):
            self.fail("mailbox.query", f"no unread count in {reply}")

    @task(1)
    def offline_and_back(self) -> None:
        if not self.connected():
            return
        # Offline: UNSUB then PING/PONG, still handling messages for the subscription until
        # the PONG: every message the broker wrote to us before it processed the UNSUB
        # (delivered, for mq9) is read; what comes after stays stored for the replay.
        t0 = time.perf_counter()
        try:
            self.nc.drain(self.owner_sid, REQUEST_TIMEOUT)
        except NatsError as e:
            self.fire("agent.offline", t0, exc=e)
            return
        finally:
            self.box.online = False
            self.close()
        self.fire("agent.offline", t0)
        COUNTERS["offline periods"] += 1
        gevent.sleep(random.uniform(*OFFLINE_SECONDS))

        if not self.connect("agent.reconnect"):
            return
        self.replay_wait = set(self.box.outstanding)
        self.replay_done.clear()
        expected = len(self.replay_wait)
        t0 = time.perf_counter()
        self.subscribe_owner()
        if not expected:
            return
        self.replay_done.wait(REPLAY_TIMEOUT)
        missing, self.replay_wait = self.replay_wait, set()
        if missing:
            COUNTERS["inbox lost"] += len(missing)
            for msg_id in missing:
                self.box.outstanding.pop(msg_id, None)
                self.box.lost.add(msg_id)
            self.fire("inbox.lost", t0, exc=Mq9Error(
                f"{len(missing)} of {expected} acked messages not replayed within "
                f"{REPLAY_TIMEOUT}s ({self.where(missing)})"))
            return
        COUNTERS["replays"] += 1
        COUNTERS["replayed messages"] += expected
        self.fire("inbox.replay", t0, length=expected,
                  ms=(self.replay_last - t0) * 1000)


# ---------------------------------------------------------------------------- broadcast


class BroadcastUser(NatsUser):
    """Publishes tasks on $mq9.AI.BROADCAST.task.available and works on them in queue
    group task-workers; results go to the publisher's mailbox (the guide's pattern)."""

    weight = 1
    wait_time = between(0.05, 0.3)

    def __init__(self, environment):
        super().__init__(environment)
        self.mail_id = ""
        self.token = ""
        self.pending: dict[str, float] = {}      # task_id -> perf_counter at publish
        self.done: set[str] = set()
        self.seq = 0

    def on_start(self) -> None:
        if not self.connect():
            raise RuntimeError(f"cannot connect to {self.host}")
        reply = self.create_mailbox()
        if reply is None:
            raise RuntimeError("mailbox.create failed")
        self.mail_id, self.token = reply["mail_id"], reply["token"]
        self.resubscribe()

    def resubscribe(self) -> None:
        self.nc.subscribe(f"$mq9.AI.INBOX.{self.mail_id}.*", self.on_result)
        self.nc.subscribe(TASK_SUBJECT, self.on_task, queue=TASK_QUEUE)

    def on_stop(self) -> None:
        if self.nc is not None and not self.nc.closed:
            self.delete_mailbox(self.mail_id, self.token)
        self.close()

    def on_task(self, msg: Msg) -> None:
        try:
            t = json.loads(msg.data)
            task_id, master = t["task_id"], t["from"]
        except (ValueError, KeyError, TypeError):
            self.fail("broadcast.task→result", f"bad task {msg.data[:100]!r}")
            return
        TASKS_BY_WORKER[self.uid] += 1
        COUNTERS["tasks handled"] += 1
        self.nc.publish(f"$mq9.AI.INBOX.{master}.normal",
                        json.dumps({"from": self.mail_id, "task_id": task_id,
                                    "result": {"ok": True}}).encode())

    def on_result(self, msg: Msg) -> None:
        try:
            task_id = json.loads(msg.data)["task_id"]
        except (ValueError, KeyError, TypeError):
            self.fail("broadcast.task→result", f"bad result {msg.data[:100]!r}")
            return
        started = self.pending.pop(task_id, None)
        if started is not None:
            self.done.add(task_id)
            COUNTERS["task results"] += 1
            self.fire("broadcast.task→result", started, length=len(msg.data))
        elif task_id in self.done:
            COUNTERS["task duplicates"] += 1
            self.fail("broadcast.task duplicate", f"task {task_id} handled twice")
        else:
            COUNTERS["task results late"] += 1  # reported lost before

    def check_lost(self) -> None:
        limit = time.perf_counter() - TASK_LOST_AFTER
        for task_id, started in list(self.pending.items()):
            if started < limit:
                del self.pending[task_id]
                COUNTERS["tasks lost"] += 1
                self.fail("broadcast.task lost", f"no result for {task_id} in "
                                                 f"{TASK_LOST_AFTER}s")

    @task
    def publish_task(self) -> None:
        if not self.connected():
            return
        self.check_lost()
        self.seq += 1
        task_id = f"{self.mail_id}-{self.seq}"
        body = json.dumps({"from": self.mail_id, "task_id": task_id,
                           "data": {"n": self.seq}}).encode()
        t0 = time.perf_counter()
        self.pending[task_id] = t0
        try:
            self.nc.publish(TASK_SUBJECT, body)
            self.nc.flush(REQUEST_TIMEOUT)
        except NatsError as e:
            self.pending.pop(task_id, None)
            self.fire("broadcast.publish", t0, exc=e)
            return
        COUNTERS["tasks published"] += 1
        self.fire("broadcast.publish", t0, length=len(body))


# ---------------------------------------------------------------------------- request/reply


class RequestReplyUser(NatsUser):
    """A responder on agents.echo and requests to it."""

    weight = 1
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        if not self.connect():
            raise RuntimeError(f"cannot connect to {self.host}")
        self.resubscribe()

    def resubscribe(self) -> None:
        self.nc.subscribe(ECHO_SUBJECT, self.on_echo, queue="echo")

    def on_stop(self) -> None:
        self.close()

    def on_echo(self, msg: Msg) -> None:
        if msg.reply:
            self.nc.publish(msg.reply, msg.data)

    @task(5)
    def echo(self) -> None:
        if not self.connected():
            return
        payload = secrets.token_bytes(64)
        t0 = time.perf_counter()
        try:
            msg = self.nc.request(ECHO_SUBJECT, payload, timeout=REQUEST_TIMEOUT)
            if msg.data != payload:
                raise Mq9Error(f"echo returned {msg.data[:20]!r}...")
        except (NatsError, Mq9Error) as e:
            self.fire("request agents.echo", t0, exc=e)
            return
        self.fire("request agents.echo", t0, length=len(msg.data))

    @task(1)
    def no_responders(self) -> None:
        if not self.connected():
            return
        t0 = time.perf_counter()
        try:
            self.nc.request(f"agents.nobody.{secrets.token_hex(4)}", b"?", timeout=REQUEST_TIMEOUT)
        except NoResponders:
            self.fire("request (no responders)", t0)
            return
        except NatsError as e:
            self.fire("request (no responders)", t0, exc=e)
            return
        self.fire("request (no responders)", t0, exc=Mq9Error("a reply from nobody"))


# ---------------------------------------------------------------------------- summary


@events.test_stop.add_listener
def _summary(environment, **_kw) -> None:
    per_worker = sorted(TASKS_BY_WORKER.values())
    workers = (f"{len(per_worker)} workers, {per_worker[0]}..{per_worker[-1]} each"
               if per_worker else "no workers")
    parts = [f"{k}={v}" for k, v in sorted(COUNTERS.items())]
    log.info("mq9 locust: %s; tasks: %s", " ".join(parts) or "nothing counted", workers)
