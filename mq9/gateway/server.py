"""A gateway process: the NATS listener and the wiring between clients, the router, the
mesh of gateways and the shards.

``Gateway`` is the ``broker`` every ``Client`` talks to. It decides, per publish, whether the
subject is an mq9 operation (``Mailboxes``) or plain NATS (``Router``), and per subscription
whether it is a mailbox owner subscription (sent to the shard) or a plain one (sublist).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping

import zmq
from prometheus_client import Counter

from mq9 import __version__, log, metrics, nodefile, process, subjects
from mq9 import reload as reloading
from mq9.config import Config
from mq9.gateway import auth, reauth, tls
from mq9.gateway.bcryptchecks import BcryptChecks
from mq9.gateway.client import PING, PONG, Client, Subscription, Traffic
from mq9.gateway.conncount import ConnCounter
from mq9.gateway.mailboxes import Mailboxes
from mq9.gateway.peers import Peers
from mq9.gateway.router import Router
from mq9.gateway.shardlink import ShardLink
from mq9.gateway.topology import Topology, gateway_id
from mq9.protocol import NATS_VERSION, errors

NO_RESPONDERS_GRACE = 0.005  # seconds
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# Longest a gateway waits at start for the node's other gateways to answer on the mesh
# before it accepts clients anyway (a sibling hung at start must not keep it closed).
MESH_WAIT = 10.0  # seconds
MAX_CONNZ = 5000  # above this many connections, /connz is refreshed every 10 s, not every second
_MAILBOX = subjects.KINDS.index("mailbox")  # the kind_of of a $mq9.AI subject other than a broadcast


class Gateway:
    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.index = index
        self.loop = loop
        self.log = log.bind()
        self.ctx = zmq.Context()
        self.node = cfg.node_id or "local"
        self.gw_id = gateway_id(self.node, index)
        self.topology = Topology(cfg, self.node)
        self.topology.refresh()
        self.peers = Peers(cfg, self.gw_id, index, self.ctx, loop)
        self.router = Router(self.gw_id, self.peers)
        self.link = ShardLink(self.topology, self.gw_id.encode(), self.ctx, loop)
        self.mailboxes = Mailboxes(cfg, self.link, self.router)
        self.conns = ConnCounter(cfg, index)
        self.clients: dict[int, Client] = {}
        self._cid = index << 40  # client ids unique across the node's gateways
        self._key = 0
        self._dirty: list[Client] = []
        self._flush_scheduled = False
        self.users = auth.load(cfg.auth_file) if cfg.auth_file else None
        self.auth_required = bool(cfg.auth_token or cfg.user or self.users)
        self.bcrypt = BcryptChecks(loop)
        self._recheck: reauth.Recheck | None = None  # the pass after the last reload
        self.tls = tls.server_context(cfg) if cfg.tls_cert else None
        # One server_id and name per node, chosen by the supervisor: INFO and /varz agree
        # whichever gateway a client reaches.
        node = nodefile.read(cfg.run_dir)
        self.server_id = node.server_id if node else uuid.uuid4().hex.upper()[:22]
        self.server_name = node.server_name if node else (cfg.server_name
                                                          or f"mq9-{socket.gethostname()}")
        self._info_base: dict[str, object] = {
            "server_id": self.server_id,
            "server_name": self.server_name,
            "version": NATS_VERSION,
            "mq9_version": __version__,
            "proto": 1,
            "go": "mq9 (python)",
            "host": cfg.host,
            "port": cfg.port,
            "headers": True,
            "max_payload": cfg.max_payload,
        }
        self._set_security_info()
        self.lame_duck = False
        self._lame_duck_task: asyncio.Task[None] | None = None
        self._update_connect_urls()
        self.server: asyncio.AbstractServer | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._topology_timer: asyncio.TimerHandle | None = None
        self._stats_timer: asyncio.TimerHandle | None = None
        # Per kind (plain, broadcast, mailbox): the counters, and what was reported of them
        # and the metrics they go to, both in Traffic.totals' order.
        self.kinds = [Traffic() for _ in subjects.KINDS]
        self._kind_reported = [(0, 0, 0, 0) for _ in subjects.KINDS]
        self._kind_metrics: list[tuple[Counter, Counter, Counter, Counter]] = [
            (metrics.MESSAGES_IN.labels(k), metrics.BYTES_IN.labels(k),
             metrics.MESSAGES_OUT.labels(k), metrics.BYTES_OUT.labels(k))
            for k in subjects.KINDS]
        self._closed_totals = {"in_msgs": 0, "out_msgs": 0, "in_bytes": 0, "out_bytes": 0}
        self.slow_consumers = 0
        self._stats_path = os.path.join(cfg.run_dir, f"stats-gw-{index}.json")

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.peers.start(self.router, self.topology.gateways())
        self.link.start(self.mailboxes)
        self._topology_timer = self.loop.call_later(0.2, self._watch_topology)
        # No client before the node's other gateways have answered on the mesh: a PING
        # before that could only be answered by the barrier's timeout, with the interest
        # of "subscribe, flush" not yet known to them. The supervisor starts all gateways
        # together and counts the node ready once each listens, so readiness means the
        # mesh is up. Gateways of other nodes are not waited for: a node that is down
        # would keep this one closed; their barrier timeout stays the fallback.
        siblings = [gateway_id(self.node, j) for j in range(self.cfg.gateway_count) if j != self.index]
        missing = await self.peers.wait_acked(siblings, MESH_WAIT)
        if missing:
            self.log.warning("gateway_mesh_incomplete", peers=",".join(missing), waited=MESH_WAIT)
        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.cfg.host, self.cfg.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        # create_server listens again, with its own default (100) unless told: thousands of
        # clients reconnecting at once would overflow it and wait out SYN retransmits.
        self.server = await self.loop.create_server(self._new_client, sock=sock, backlog=LISTEN_BACKLOG)
        self._pinger = self.loop.call_later(self.cfg.ping_interval, self._ping_clients)
        self._stats_timer = self.loop.call_later(1.0, self._report_stats)
        self.log.info("gateway_listening", host=self.cfg.host, port=self.cfg.port, index=self.index)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.clients.values()):
            c.close()
        self.mailboxes.flush_acks()
        for timer in (self._stats_timer, self._topology_timer, self._pinger):
            if timer is not None:
                timer.cancel()
        await asyncio.sleep(0.05)
        self.link.close()
        self.peers.close()
        self.ctx.term()
        self.conns.close()

    # ---- connect_urls and lame-duck mode ----------------------------------------------

    def _update_connect_urls(self, ldm: bool = False) -> None:
        """INFO's ``connect_urls``: the cluster's client URLs, so a client given one URL
        can fail over to the others (none on a single node, as nats-server). When they
        change, clients that take asynchronous INFOs are told, as nats-server does."""
        urls: list[str] = []
        if self.topology.owners is not None and not self.cfg.no_advertise:
            from mq9.cluster.state import client_urls  # only gateways of clustered nodes need it

            # In lame-duck mode this node stops advertising itself at once; the others
            # drop it when the metadata group says so.
            urls = client_urls(self.topology.members, exclude=self.node if self.lame_duck else None)
        if ldm:
            self._info_base["ldm"] = True
        elif urls == self._info_base.get("connect_urls", []):
            return
        if urls:
            self._info_base["connect_urls"] = urls
        else:
            self._info_base.pop("connect_urls", None)
        for c in list(self.clients.values()):
            if c.connected and c.proto >= 1 and not c.closed:
                c.send(self.info_line(c))

    def enter_lame_duck(self, done: Callable[[], None]) -> None:
        """SIGUSR2 from the supervisor (nats-server's lame-duck mode): stop accepting,
        tell the clients (INFO ``ldm``, connect_urls without this node), wait the grace
        period, then close the clients spread over the rest of ``lame_duck_duration``,
        so they do not all reconnect elsewhere at once. ``done()`` when none is left."""
        if self.lame_duck:
            return
        self.lame_duck = True
        if self.server is not None:
            self.server.close()
        self._lame_duck_task = self.loop.create_task(self._lame_duck(done))

    async def _lame_duck(self, done: Callable[[], None]) -> None:
        cfg = self.cfg
        clients = [c for c in self.clients.values() if not c.closed]
        self.log.info("gateway_lame_duck", clients=len(clients),
                      grace_period=cfg.lame_duck_grace_period, duration=cfg.lame_duck_duration)
        if not clients:
            done()
            return
        self._update_connect_urls(ldm=True)
        await asyncio.sleep(cfg.lame_duck_grace_period)
        # nats-server's pacing: the rest of the duration split between the clients, at
        # most a second apart, each pause a random part of that of at least half.
        spread = max(cfg.lame_duck_duration - cfg.lame_duck_grace_period, 1.0)
        pause = min(spread / len(clients), 1.0)
        batch = 1
        if pause < 0.001:  # many clients: close several per pause
            batch = int(len(clients) * 0.001 / spread) + 1
            pause = 0.001
        self.log.info("gateway_lame_duck_closing", clients=len(clients), pause=round(pause, 4))
        for i, c in enumerate(clients):
            c.close()
            if i == len(clients) - 1:
                break
            if batch == 1 or i % batch == 0:
                await asyncio.sleep(random.uniform(pause / 2, pause))
        done()

    def _new_client(self) -> Client:
        self._cid += 1
        return Client(self, self._cid)

    # ---- broker interface used by Client ---------------------------------------------

    def info_line(self, client: Client, connect_info: bool = False) -> bytes:
        info = dict(self._info_base, client_id=client.cid, client_ip=client.remote[0])
        if connect_info:
            info["connect_info"] = True
        return b"INFO " + json.dumps(info, separators=(",", ":")).encode() + b" \r\n"

    def admit(self, client: Client) -> bool:
        if self.conns.total() >= self.cfg.max_connections:
            return False
        self.clients[client.cid] = client
        self.conns.set(len(self.clients))
        return True

    def release(self, client: Client) -> None:
        if self.clients.pop(client.cid, None) is not None:
            self.conns.set(len(self.clients))
            t = self._closed_totals
            t["in_msgs"] += client.msgs_in
            t["out_msgs"] += client.msgs_out
            t["in_bytes"] += client.bytes_in
            t["out_bytes"] += client.bytes_out

    def check_auth(self, opts: Mapping[str, object], client: Client) -> bool | None:
        """True or False; None when a bcrypt check decides, whose answer goes to
        ``client.auth_done``. Sets ``client.perms`` for a user with permissions."""
        cfg = self.cfg
        if self.users is not None:
            return self._check_user(self.users, opts, client)
        if cfg.auth_token:
            tok = opts.get("auth_token")
            return isinstance(tok, str) and hmac.compare_digest(tok.encode(), cfg.auth_token.encode())
        user, pw = opts.get("user"), opts.get("pass")
        if not isinstance(user, str) or not isinstance(pw, str):
            return False
        return (hmac.compare_digest(user.encode(), (cfg.user or "").encode())
                & hmac.compare_digest(pw.encode(), (cfg.password or "").encode())) == 1

    def _check_user(self, users: auth.Users, opts: Mapping[str, object], client: Client) -> bool | None:
        name, pw = opts.get("user"), opts.get("pass")
        if not isinstance(name, str) or not isinstance(pw, str):
            return False
        user = users.get(name)
        if user is None:
            return False
        ok = user.check_fast(pw)
        if ok is None:
            def done(ok: bool) -> None:
                if client.closed:  # the auth timeout came first
                    return
                if self.users is None or self.users.get(name) is not user:
                    # a reload changed this user meanwhile: the new settings decide
                    again = self.check_auth(opts, client) if self.auth_required else True
                    if again is not None:
                        client.auth_done(again)
                    return
                if ok:
                    client.user, client.perms = user, user.conn_perms()
                client.auth_done(ok)

            self.bcrypt.wait(user, pw, done)
            return None
        if ok:
            client.user, client.perms = user, user.conn_perms()
        return ok

    def auth_failed(self, kind: str) -> None:
        metrics.AUTH_FAILURES.labels(kind).inc()

    def tls_failed(self, client: Client, exc: BaseException) -> None:
        # Debug only: port scanners and plain-text clients would otherwise flood the log.
        metrics.AUTH_FAILURES.labels("tls").inc()
        self.log.debug("tls_handshake_failed", cid=client.cid, ip=client.remote[0],
                       error=f"{type(exc).__name__}: {exc}")

    def slow_consumer(self, client: Client) -> None:
        metrics.SLOW_CONSUMERS.inc()
        metrics.DROPS.labels("slow_consumer").inc()
        self.slow_consumers += 1
        self.log.warning("slow_consumer", cid=client.cid, name=client.name)

    def next_key(self) -> int:
        self._key += 1
        return self._key

    def want_flush(self, client: Client) -> None:
        self._dirty.append(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for c in dirty:
            c.flush()

    def pong_when_routed(self, client: Client) -> None:
        def pong() -> None:
            client.send(PONG)
            if client.info_after_pong:
                client.info_after_pong = False
                client.send(self.info_line(client, connect_info=True))

        if client.held_pongs is not None:
            # A no-responders answer is still pending: it must reach the client first.
            client.held_pongs.append(pong)
        else:
            self.peers.barrier(pong)

    def publish(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
                client: Client) -> None:
        k = self.kinds[subjects.kind_of(subject)]
        k.msgs_in += 1
        k.bytes_in += len(payload)
        if subject.startswith(subjects.PREFIX) and self.mailboxes.handle(subject, reply, headers, payload, client):
            return
        if not self.router.route(subject, reply, headers, payload, client):
            self._nobody_listens(subject, reply, headers, payload, client)

    def publish_run(self, subject: str, replies: list[str | None] | None, payloads: list[bytes],
                    nbytes: int, client: Client) -> None:
        """Several header-less messages published in a row to one subject (``replies``:
        None, or each one's reply subject)."""
        kind = subjects.kind_of(subject)
        k = self.kinds[kind]
        k.msgs_in += len(payloads)
        k.bytes_in += nbytes
        if kind == _MAILBOX and self.mailboxes.handle_run(subject, replies, payloads, client):
            return
        if replies is None:
            if not self.router.route_run(subject, None, payloads, client):
                for p in payloads:
                    self._nobody_listens(subject, None, None, p, client)
            return
        route = self.router.route
        for reply, p in zip(replies, payloads):
            if not route(subject, reply, None, p, client):
                self._nobody_listens(subject, reply, None, p, client)

    def _nobody_listens(self, subject: str, reply: str | None, headers: bytes | None, payload: bytes,
                        client: Client) -> None:
        if reply and client.no_responders:
            # A responder's SUB may still be on its way to this gateway (nats-py even
            # sends the PING of flush() ahead of a buffered SUB), so look again after
            # a peer round trip before answering 503.
            client.rechecks += 1
            if client.held_pongs is None:
                client.held_pongs = []
            self.loop.call_later(NO_RESPONDERS_GRACE, self._no_responders_recheck,
                                 subject, reply, headers, payload, client)

    def _no_responders_recheck(self, subject: str, reply: str, headers: bytes | None, payload: bytes,
                               client: Client) -> None:
        if client.closed:
            return

        def again() -> None:
            if client.closed:
                return
            if not self.router.route(subject, reply, headers, payload, client):
                status = b"NATS/1.0 503\r\nNats-Subject: %s\r\n\r\n" % subject.encode(
                    "utf-8", "surrogateescape")
                self.router.no_responders(reply, status, client)
            client.rechecks -= 1
            if client.rechecks == 0:
                held, client.held_pongs = client.held_pongs or [], None
                for pong in held:
                    self.peers.barrier(pong)

        self.peers.barrier(again)

    def subscribe(self, sub: Subscription) -> None:
        owner = subjects.owner_subscription(sub.subject)
        if owner is not None:
            self.mailboxes.subscribe(sub, owner)
        else:
            self.router.add_local(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.owner is not None:
            self.mailboxes.unsubscribe(sub)
        else:
            self.router.remove_local(sub)

    def _set_security_info(self) -> None:
        """INFO's TLS and auth fields from the current settings (at start and on reload)."""
        info = {k: v for k, v in self._info_base.items()
                if k not in ("tls_required", "tls_verify", "auth_required")}
        info.update(tls.info_fields(self.cfg))
        if self.auth_required:
            info["auth_required"] = True
        self._info_base = info

    def reload(self) -> None:
        """SIGHUP from the supervisor: new users, TLS context and INFO for new connections;
        when authorization changed, every connection is checked again (``reauth``). A
        client keeps the TLS session it handshook."""
        try:
            doc = reloading.read(self.cfg.run_dir)
            if doc is None:
                return
            cfg = reloading.apply(self.cfg, doc)
            # The supervisor checked these files; one that changed since is caught here.
            users = auth.load(cfg.auth_file) if cfg.auth_file else None
            ctx = tls.server_context(cfg) if cfg.tls_cert else None
        except Exception as e:  # noqa: BLE001 - a bad reload must never take the gateway down
            self.log.error("reload_failed", error=str(e), hint="this gateway keeps its configuration")
            return
        log.set_level(cfg.log_level)
        if users is not None:
            users = auth.carry_over(self.users, users)
        recheck = reauth.auth_changed(self.cfg, self.users, cfg, users)
        self.cfg, self.users, self.tls = cfg, users, ctx
        self.auth_required = bool(cfg.auth_token or cfg.user or users)
        self._set_security_info()
        self.log.info("config_reloaded", generation=doc.generation, users=len(users or ()),
                      tls=ctx is not None, log_level=cfg.log_level)
        if recheck:
            if self._recheck is not None:
                self._recheck.stop()
            self._recheck = reauth.Recheck(self, doc.generation)
            self._recheck.start()

    def log_state(self) -> None:
        """SIGUSR1: one line with what this gateway knows of its peers (for operators)."""
        self.log.info("gateway_state", gw=self.gw_id, topology=self.topology.version,
                      peers=",".join(sorted(self.peers.out)), stalled=",".join(sorted(self.peers.stalled)),
                      sent=str(self.peers.sent), acked=str(self.peers.acked),
                      remote_interest=len(self.router.remote), clients=len(self.clients),
                      remote_subjects=",".join(sorted({f"{k[0]}:{k[1]}" for k in self.router.remote})[:50]))

    # ---- timers ----------------------------------------------------------------------

    def _watch_topology(self) -> None:
        """The metadata group rewrites its snapshot file on every change; a stat every
        200 ms is cheaper than a notification channel and needs no extra socket."""
        try:
            if self.topology.refresh():
                self.log.info("topology_changed", version=self.topology.version,
                              members=len(self.topology.members))
                self.peers.update(self.topology.gateways())
                self.mailboxes.on_topology_changed()
                self._update_connect_urls()
        except Exception:
            self.log.exception("topology_refresh_failed")
        self._topology_timer = self.loop.call_later(0.2, self._watch_topology)

    def _ping_clients(self) -> None:
        for c in list(self.clients.values()):
            if c.closed:
                continue
            if c.pings_out >= self.cfg.max_pings_out:
                c.close_with_error(errors.STALE_CONNECTION)
                continue
            c.pings_out += 1
            c.send(PING)
        self._pinger = self.loop.call_later(self.cfg.ping_interval, self._ping_clients)

    def _report_stats(self) -> None:
        """Hot paths only bump plain ints (per kind here, per connection in ``Client``);
        once a second they are folded into the shared metrics, and the connection list
        goes to a file the supervisor serves as /connz and /varz."""
        for k, traffic in enumerate(self.kinds):
            now = traffic.totals()
            for counter, total, before in zip(self._kind_metrics[k], now, self._kind_reported[k]):
                if total != before:
                    counter.inc(total - before)
            self._kind_reported[k] = now
        self.mailboxes.report()
        subs = sum(len(c.subs) for c in self.clients.values())
        metrics.CONNECTIONS.set(len(self.clients))
        metrics.SUBSCRIPTIONS.set(subs)
        try:
            self._write_stats(subs)
        except OSError as e:
            self.log.warning("stats_write_failed", error=str(e))
        self._stats_timer = self.loop.call_later(1.0, self._report_stats)

    def _write_stats(self, subs: int) -> None:
        now = time.time()
        conns = []
        if len(self.clients) <= MAX_CONNZ or not int(now) % 10:
            conns = [c.describe(now) for c in self.clients.values()]
        totals = dict(self._closed_totals)
        for c in self.clients.values():
            totals["in_msgs"] += c.msgs_in
            totals["out_msgs"] += c.msgs_out
            totals["in_bytes"] += c.bytes_in
            totals["out_bytes"] += c.bytes_out
        doc = {"gateway": self.gw_id, "server_id": self.server_id, "now": now,
               "connections": len(self.clients), "total_connections": self._cid - (self.index << 40),
               "subscriptions": subs, "slow_consumers": self.slow_consumers, **totals,
               "conns": conns}
        tmp = self._stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, self._stats_path)


async def _main(cfg: Config, index: int) -> None:
    loop = asyncio.get_running_loop()
    gw = Gateway(cfg, index, loop)
    stop = asyncio.Event()
    # SIGTERM only: the supervisor ignores SIGINT in children so that Ctrl-C stops the
    # gateways before the shards, in order.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, gw.log_state)
    loop.add_signal_handler(signal.SIGUSR2, gw.enter_lame_duck, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload)
    reloading.accept(signal.SIGHUP, signal.SIGUSR2)
    await gw.start()
    process.settle_heap()
    await stop.wait()
    if gw._lame_duck_task is not None:
        gw._lame_duck_task.cancel()
    gw.log.info("gateway_draining", clients=len(gw.clients))
    await gw.stop()


def run(cfg: Config, index: int) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # uvloop is a dependency; plain asyncio still works without it
        pass
    asyncio.run(_main(cfg, index))
