"""The monitoring port's routes, served by a real HTTP server on a free port, in front of
a node state written down here (the node's own answers are tests/test_monitoring.py's)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from mq9 import procfs
from mq9.config import Config


class State:
    """Stands for the node: what ``monitor_http.NodeState`` names, nothing more."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.group = None
        self.server_id = "NTESTSERVERID"
        self.server_name = "test-node"
        self.started_wall = time.time()
        self.cpu = procfs.CpuPercent()
        self.bad: list[str] = []
        self.asked: list[str] = []

    def health(self, path: str) -> list[str]:
        self.asked.append(path)
        return self.bad

    def slots_unavailable(self) -> int:
        return 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    from mq9.monitor_http import MonitorServer

    port = _free_port()
    state = State(Config(host="127.0.0.1", port=_free_port(), metrics_port=port,
                         data_dir=str(tmp_path / "data"), gateways=3))
    server = MonitorServer(state, "127.0.0.1", port)
    try:
        yield server, state, port
    finally:
        server.close()


def test_bound_but_silent_until_serve(served):
    server, _, port = served
    with pytest.raises(OSError):
        _get(port, "/healthz")
    server.serve()
    assert _get(port, "/healthz")[0] == 200


def test_health_routes_answer_as_nats_server(served):
    server, state, port = served
    server.serve()
    assert _get(port, "/healthz") == (200, "application/json", '{"status":"ok"}')
    state.bad = ["gateway-1 is not serving", "node is starting"]
    assert _get(port, "/readyz?x=1") == (
        503, "application/json",
        '{"status":"unavailable","error":"gateway-1 is not serving; node is starting"}')
    assert state.asked == ["/healthz", "/readyz"]


def test_metrics_varz_and_unknown_paths(served):
    server, state, port = served
    server.serve()
    code, ctype, body = _get(port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert "mq9_slots_unavailable 7.0" in body and "mq9_build_info{" in body
    code, ctype, body = _get(port, "/varz")
    assert code == 200 and ctype == "application/json"
    doc = json.loads(body)
    assert doc["server_id"] == "NTESTSERVERID" and doc["server_name"] == "test-node"
    assert doc["http_port"] == port
    assert _get(port, "/nope")[:2] == (404, "text/plain; charset=utf-8")
    assert _get(port, "/varz/more")[0] == 404


def test_a_port_someone_listens_on_fails_at_once(served):
    from mq9.monitor_http import MonitorServer

    server, state, port = served
    server.serve()
    with pytest.raises(OSError):
        MonitorServer(state, "127.0.0.1", port)
