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

from mq9 import __version__, metrics
from mq9.config import Config

_SORTS = {"cid", "start", "pending_bytes", "in_msgs", "out_msgs", "in_bytes", "out_bytes",
          "subscriptions", "uptime", "last_activity"}


def _gateway_stats(cfg: Config) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(cfg.run_dir, "stats-gw-*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue  # a gateway being restarted: its next file will do
    return out


def _tls_fields(cfg: Config) -> dict:
    """nats-server's /varz names for the TLS settings (present only when TLS is on)."""
    if not cfg.tls_cert:
        return {}
    return {"tls_required": True, "tls_verify": bool(cfg.tls_verify), "tls_timeout": cfg.tls_timeout}


def varz(cfg: Config, started: float, node_id: str | None) -> dict:
    gws = _gateway_stats(cfg)

    def total(key: str) -> int:
        return sum(int(g.get(key, 0)) for g in gws)

    now = time.time()
    return {
        "server_id": node_id or "mq9",
        "server_name": cfg.server_name or node_id or "mq9",
        "version": __version__,
        "proto": 1,
        "host": cfg.host,
        "port": cfg.port,
        "http_port": cfg.metrics_port,
        "cluster_port": cfg.cluster_port,
        "max_connections": cfg.max_connections,
        "ping_interval": cfg.ping_interval,
        "ping_max": cfg.max_pings_out,
        "max_payload": cfg.max_payload,
        "max_control_line": cfg.max_control_line,
        "max_pending": cfg.max_pending,
        "auth_required": bool(cfg.auth_token or cfg.user or cfg.auth_file),
        "max_subscriptions": cfg.max_subscriptions,
        **_tls_fields(cfg),
        "start": _iso(started),
        "now": _iso(now),
        "uptime": f"{int(now - started)}s",
        "cores": os.cpu_count(),
        "gateways": len(gws),
        "shards": cfg.shards,
        "connections": total("connections"),
        "total_connections": total("total_connections"),
        "subscriptions": total("subscriptions"),
        "slow_consumers": total("slow_consumers"),
        "in_msgs": total("in_msgs"),
        "out_msgs": total("out_msgs"),
        "in_bytes": total("in_bytes"),
        "out_bytes": total("out_bytes"),
    }


def connz(cfg: Config, query: dict[str, str]) -> dict:
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
        c["uptime"] = f"{int(c['uptime'])}s"
    return {"now": _iso(time.time()), "num_connections": len(page), "total": len(conns),
            "offset": offset, "limit": limit, "connections": page}


def update_cluster_gauges(group) -> None:
    st = group.status()
    snap = group.snapshot()
    metrics.RAFT_LEADER.set(1 if group.is_leader() else 0)
    metrics.RAFT_TERM.set(st.get("term") or 0)
    metrics.RAFT_COMMIT_INDEX.set(st.get("commit_index") or 0)
    metrics.SLOTS_OWNED.set(sum(1 for node, _ in snap.slots if node == group.node_id))
    metrics.SLOT_MOVES.set(len(snap.moves))


def _int(v, default: int) -> int:
    try:
        return max(0, int(v)) if v is not None else default
    except ValueError:
        return default


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"
