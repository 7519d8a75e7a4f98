"""The node's monitoring documents, shaped like nats-server's: /varz and /connz.

Gateways write their connection list and totals to ``run_dir/stats-gw-N.json`` once a
second; the supervisor's HTTP thread reads those files here, so serving /connz never
touches a gateway's event loop. The metadata group's figures (Raft leader, term, commit
index, slots owned) become gauges in ``update_cluster_gauges``, called from the
supervisor's loop.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mq9 import __version__, cpus, metrics, procfs
from mq9.config import Config
from mq9.protocol import NATS_VERSION

if TYPE_CHECKING:
    from mq9.cluster.state import ClusterState

# A JSON object: the gateways' stats files as read, the documents served. Their values are
# of every JSON type, so Any is what they are.
Json = dict[str, Any]

_SORTS = {"cid", "start", "pending_bytes", "in_msgs", "out_msgs", "in_bytes", "out_bytes",
          "subscriptions", "uptime", "last_activity"}


class ClusterView(Protocol):
    """What the monitoring port reads of the metadata group
    (``mq9.cluster.metadata.MetadataGroup``)."""

    @property
    def node_id(self) -> str: ...

    def snapshot(self) -> ClusterState: ...

    def status(self) -> Mapping[str, Any]: ...

    def is_leader(self) -> bool: ...


def _gateway_stats(cfg: Config) -> list[Json]:
    out = []
    for path in sorted(glob.glob(os.path.join(cfg.run_dir, "stats-gw-*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue  # a gateway being restarted: its next file will do
    return out


def _tls_fields(cfg: Config) -> Json:
    """nats-server's /varz names for the TLS settings (present only when TLS is on)."""
    if not cfg.tls_cert:
        return {}
    return {"tls_required": True, "tls_verify": bool(cfg.tls_verify)}


@dataclass
class NodeView:
    """What the supervisor knows of its node, for /varz."""

    server_id: str
    server_name: str
    started: float
    usage: procfs.Usage
    cpu_percent: float
    gateways: int


def varz(cfg: Config, node: NodeView) -> Json:
    """nats-server's /varz: its names, types and units (durations in nanoseconds, mem in
    bytes, cpu in percent of one core) for everything it has; mq9's own fields after."""
    gws = _gateway_stats(cfg)

    def total(key: str) -> int:
        return sum(int(g.get(key, 0)) for g in gws)

    now = time.time()
    cluster: Json = {}
    if cfg.cluster_port:  # the supervisor sets it to 0 on a single node
        cluster = {"addr": cfg.host, "cluster_port": cfg.cluster_port}
        if cfg.node_id:
            cluster["name"] = cfg.node_id
    doc: Json = {
        "server_id": node.server_id,
        "server_name": node.server_name,
        "version": NATS_VERSION,
        "proto": 1,
        "host": cfg.host,
        "port": cfg.port,
        "max_connections": cfg.max_connections,
        "ping_interval": int(cfg.ping_interval * 1e9),
        "ping_max": cfg.max_pings_out,
        "http_host": cfg.host,
        "http_port": cfg.metrics_port,
        "auth_timeout": cfg.auth_timeout,
        "max_control_line": cfg.max_control_line,
        "max_payload": cfg.max_payload,
        "max_pending": cfg.max_pending,
        "cluster": cluster,
        "tls_timeout": cfg.tls_timeout,
        **_tls_fields(cfg),
        "start": _iso(node.started),
        "now": _iso(now),
        "uptime": _uptime(now - node.started),
        "mem": node.usage.rss_bytes,
        "cores": cpus.usable(),
        "cpu": node.cpu_percent,
        "connections": total("connections"),
        "total_connections": total("total_connections"),
        "in_msgs": total("in_msgs"),
        "in_bytes": total("in_bytes"),
        "in_client_msgs": total("in_msgs"),
        "in_client_bytes": total("in_bytes"),
        "out_msgs": total("out_msgs"),
        "out_bytes": total("out_bytes"),
        "out_client_msgs": total("out_msgs"),
        "out_client_bytes": total("out_bytes"),
        "slow_consumers": total("slow_consumers"),
        "subscriptions": total("subscriptions"),
        # mq9's own
        "mq9_version": __version__,
        "gateways": node.gateways,
        "shards": cfg.shards,
        "processes": node.usage.processes,
        "max_subscriptions": cfg.max_subscriptions,
    }
    if cfg.auth_token or cfg.user or cfg.auth_file:
        doc["auth_required"] = True
    return doc


def connz(cfg: Config, query: dict[str, str]) -> Json:
    """``?offset=&limit=&sort=`` as nats-server takes them (sort descending but ``cid``)."""
    conns = [c for g in _gateway_stats(cfg) for c in g.get("conns", ())]
    sort = query.get("sort", "cid")
    if sort not in _SORTS:
        sort = "cid"
    conns.sort(key=lambda c: c.get(sort, 0), reverse=sort != "cid")
    offset = _int(query.get("offset"), 0)
    limit = _int(query.get("limit"), 1024)
    page = conns[offset:offset + limit]
    for c in page:
        c["start"] = _iso(c["start"])
        c["last_activity"] = _iso(c["last_activity"])
        c["uptime"] = _uptime(c["uptime"])
    return {"now": _iso(time.time()), "num_connections": len(page), "total": len(conns),
            "offset": offset, "limit": limit, "connections": page}


def update_cluster_gauges(group: ClusterView) -> None:
    st = group.status()
    snap = group.snapshot()
    metrics.RAFT_LEADER.set(1 if group.is_leader() else 0)
    metrics.RAFT_TERM.set(st.get("term") or 0)
    metrics.RAFT_COMMIT_INDEX.set(st.get("commit_index") or 0)
    metrics.SLOTS_OWNED.set(sum(1 for node, _ in snap.slots if node == group.node_id))
    metrics.SLOT_MOVES.set(len(snap.moves))


def _int(v: str | None, default: int) -> int:
    try:
        return max(0, int(v)) if v is not None else default
    except ValueError:
        return default


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def _uptime(seconds: float) -> str:
    """nats-server's spelling: 45s, 3m5s, 2h3m5s, 1d2h3m5s."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h{m}m{s}s"
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
