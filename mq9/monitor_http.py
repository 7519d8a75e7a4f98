"""The node's monitoring port (``--metrics-port``): /metrics, /varz, /connz, /mailboxz,
/healthz and /readyz, as nats-server's monitor.go serves its own (one handler per path in
a route table). Runs in threads beside the node's main loop and reads the node through the
few members ``NodeState`` names. Imported only once ``PROMETHEUS_MULTIPROC_DIR`` is set
(``prometheus_client`` picks single- or multi-process values when first imported).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from mq9 import __version__, log, mailbox_list, metrics, monitor, procfs
from mq9.config import Config
from mq9.protocol import NATS_VERSION

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str, str], Response]  # (path, query string) -> Response


class NodeState(Protocol):
    """What the monitoring port reads of its node (``mq9.node.Node``); read-only, so the
    node may hold a narrower type."""

    @property
    def cfg(self) -> Config: ...

    @property
    def group(self) -> monitor.ClusterView | None: ...  # None on a single node

    @property
    def server_id(self) -> str: ...

    @property
    def server_name(self) -> str: ...

    @property
    def started_wall(self) -> float: ...

    @property
    def cpu(self) -> procfs.CpuPercent: ...

    def health(self, path: str) -> list[str]: ...

    def slots_unavailable(self) -> int: ...


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        route = self.server.monitor.routes.get(path)
        if route is None:
            code, ctype, body = 404, TEXT, b"not found\n"
        else:
            code, ctype, body = route(path, query)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http_request", client=self.client_address[0], line=format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, monitor: MonitorServer) -> None:
        self.address_family = family  # IPv6 for an IPv6 --host
        self.monitor = monitor
        super().__init__(address, _Handler, bind_and_activate=False)


class MonitorServer:
    """Binds the port when made (a port conflict fails the node's start at once) and
    listens from ``serve()`` on: a bound socket that does not listen refuses connections
    like a closed port, so nothing answers before the node is ready."""

    def __init__(self, node: NodeState, host: str, port: int) -> None:
        self.node = node
        self.routes: dict[str, Route] = {
            "/metrics": self.metrics,
            "/varz": self.varz,
            "/connz": self.connz,
            "/mailboxz": self.mailboxz,
            "/healthz": self.health,
            "/readyz": self.health,
        }
        self.registry = CollectorRegistry()
        # prometheus_client leaves this constructor unannotated
        multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.registry.register(metrics.NodeCollector(
            node.started_wall, node.slots_unavailable,
            {"version": __version__, "nats_version": NATS_VERSION}))
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        self.http = _HttpServer((host, port), family, self)
        try:
            self.http.server_bind()
        except OSError:
            self.http.server_close()
            raise
        self.serving = False

    def serve(self) -> None:
        if self.serving:
            return
        self.http.server_activate()
        self.serving = True
        threading.Thread(target=self.http.serve_forever, name="metrics-http", daemon=True).start()

    def close(self) -> None:
        if self.serving:
            self.http.shutdown()  # waits for serve_forever, which must have started
        self.http.server_close()

    # ---- routes: (path, query string) -> (status, content type, body) ---------------------

    def metrics(self, path: str, query: str) -> Response:
        try:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        except Exception:
            log.exception("metrics_collect_failed")
            return 500, TEXT, b"metrics collection failed\n"

    def varz(self, path: str, query: str) -> Response:
        node = self.node
        doc = monitor.varz(node.cfg, monitor.NodeView(
            server_id=node.server_id, server_name=node.server_name, started=node.started_wall,
            usage=procfs.usage(fds=False), cpu_percent=node.cpu.percent,
            gateways=node.cfg.gateway_count))
        return 200, JSON, json.dumps(doc, indent=2).encode()

    def connz(self, path: str, query: str) -> Response:
        doc = monitor.connz(self.node.cfg, dict(parse_qsl(query)))
        return 200, JSON, json.dumps(doc, indent=2).encode()

    def mailboxz(self, path: str, query: str) -> Response:
        code, body = mailbox_list.serve(self.node.cfg, self.node.group, query)
        return code, JSON, body

    def health(self, path: str, query: str) -> Response:
        # nats-server's shapes: {"status":"ok"}, or 503 {"status":"unavailable","error":..}
        bad = self.node.health(path)
        doc = {"status": "unavailable", "error": "; ".join(bad)} if bad else {"status": "ok"}
        return 503 if bad else 200, JSON, json.dumps(doc, separators=(",", ":")).encode()
