"""The chart's Grafana dashboard and PrometheusRule (issue 10, item 14).

- the dashboard (helm/mq9/dashboards/mq9.json, shipped as a ConfigMap for Grafana's
  sidecar) and the alerts are checked for shape: Grafana's panel/target/variable fields,
  prometheus-operator's rule fields (kubernetes-validate has no schema for that CRD);
- every PromQL expression in both parses (``promql-parser``, Prometheus' grammar in Rust);
- every metric they use is served by a live node: a real ``mq9 node`` in cluster mode,
  as the chart runs it, after a little traffic, its /metrics scraped.

The metric names come from a small extractor (``metric_names``) that is itself checked
against the parser's own view of each expression.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import promql_parser as promql
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_packaging import CHART, FULLNAME, NAMESPACE, SCENARIOS, one, render  # noqa: E402

DASHBOARD = CHART / "dashboards" / "mq9.json"
MONITORING = SCENARIOS["monitoring"]
# What prometheus-operator's PrometheusRule allows in a rule (monitoring.coreos.com/v1).
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# Series Prometheus writes itself for each scrape target, not served on /metrics.
SCRAPE_SERIES = {"up"}
# Grafana's own variables, besides the dashboard's templating list.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# ---- metric names in PromQL -------------------------------------------------------------

# Words of PromQL's grammar that look like identifiers (functions are told apart by "(").
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not followed by "(" (a
    function or aggregation), not label names (inside {...}, or the (...) of by, without,
    on, ignoring, group_left/right), not keywords, durations or numbers."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\$\{?\w+\}?", "", s)      # Grafana variables: $__rate_interval, ${pod}
    s = re.sub(r"\{[^}]*\}", "", s)        # label matchers
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "", s)       # ranges and subqueries
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.groups()
        if not call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{job=~"$job"}[$__rate_interval])))',
     {"a_seconds_bucket"}),
    ("sum(rate(b_total[5m])) by (pod, kind) / on (pod) group_left (version) c_info",
     {"b_total", "c_info"}),
    ('(count(up{job="x", namespace="y"} == 1) or vector(0)) < 3', {"up"}),
    ("increase(d_total{a='}'}[10m] offset 5m) > 0 unless e", {"d_total", "e"}),
    ("max_over_time(f[5m:1m]) * 1e3 + g_bytes - inf", {"f", "g_bytes"}),
    ("sum without (le) (h)", {"h"}),
    ('label_replace(i, "dst", "$1", "src", "(.*)")', {"i"}),
])
def test_metric_names(expr, names):
    assert metric_names(expr) == names


# ---- the expressions the chart ships -----------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(<selector>, <label>): the selector is PromQL
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, var
            exprs.append(m.group(1))
    return exprs


def rule() -> dict:
    return one(render(MONITORING), "PrometheusRule")


def rule_exprs(pr: dict) -> list[str]:
    return [r["expr"] for g in pr["spec"]["groups"] for r in g["rules"]]


def parse(expr: str):
    """Grafana's variables swapped for what they stand for, then Prometheus' grammar."""
    expr = expr.replace("$__rate_interval", "5m")
    try:
        return promql.parse(expr)
    except Exception as e:  # the parser's own exception types differ between releases
        pytest.fail(f"not PromQL: {expr}\n{e}")


def parser_names(expr: str) -> set[str]:
    found = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            found.add(node.name)

    promql.walk(parse(expr), visit)
    return found


def all_exprs() -> list[str]:
    return dashboard_exprs(dashboard()) + rule_exprs(rule())


def test_every_expression_parses_and_names_agree():
    exprs = all_exprs()
    assert len(exprs) > 40
    for expr in exprs:
        assert metric_names(expr) == parser_names(expr), expr


# ---- the dashboard -----------------------------------------------------------------------

def test_dashboard_configmap():
    rendered = render(MONITORING)
    cm = one(rendered, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert cm["metadata"]["annotations"] == {"grafana_folder": "mq9"}
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert json.loads(cm["data"]["mq9.json"]) == dashboard()
    moved = render({"metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "labels": {"dashboards": "mq9"}}}})
    cm = one(moved, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["dashboards"] == "mq9"
    assert "grafana-dashboard.yaml" not in render()  # off by default


def test_dashboard_shape():
    dash = dashboard()
    assert dash["uid"] and dash["title"] == "mq9" and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job", "pod"} <= set(variables)

    ids, cells = set(), set()
    for p in panels(dash):
        assert p["id"] not in ids, p["title"]
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels on one grid cell
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"] and p["type"] in ("timeseries", "stat", "table"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            # every variable an expression uses is the dashboard's or Grafana's own
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= set(variables) | GRAFANA_BUILTINS, (p["title"], used)
            # and every series is narrowed to the chosen namespace, job and pods
            for sel in re.findall(r"[\w:]+\{([^}]*)\}", t["expr"]):
                for var in ("namespace", "job", "pod"):
                    assert f'{var}=~"${var}"' in sel, (p["title"], t["expr"])


# ---- the alerts ---------------------------------------------------------------------------

def test_prometheus_rule_shape():
    pr = rule()
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
    assert set(pr) == {"apiVersion", "kind", "metadata", "spec"}
    assert pr["metadata"]["name"] == FULLNAME and pr["metadata"]["namespace"] == NAMESPACE
    assert pr["metadata"]["labels"]["release"] == "prom"  # what a ruleSelector picks
    assert set(pr["spec"]) == {"groups"}
    (group,) = pr["spec"]["groups"]
    assert set(group) == {"name", "rules"} and group["name"] == "mq9"

    alerts = {}
    for r in group["rules"]:
        assert set(r) <= RULE_KEYS and "expr" in r, r
        assert ("alert" in r) != ("record" in r), r
        assert isinstance(r["expr"], str) and r["expr"].strip()
        if "for" in r:
            assert DURATION.match(r["for"]), r["for"]
        assert r["labels"]["severity"] in ("critical", "warning"), r
        assert all(isinstance(v, str) for v in r["labels"].values())
        ann = r["annotations"]
        assert set(ann) == {"summary", "description"}
        assert all(isinstance(v, str) and v.strip() for v in ann.values())
        # Prometheus' templates came through Helm untouched, and only known fields
        for text in ann.values():
            for field in re.findall(r"\{\{\s*(.*?)\s*\}\}", text):
                assert re.fullmatch(r"\$value|\$labels\.\w+", field), field
        # every alert looks at this release's nodes only: the ServiceMonitor's job
        assert f'job="{FULLNAME}-metrics"' in r["expr"] and f'namespace="{NAMESPACE}"' in r["expr"]
        assert r["alert"] not in alerts, r["alert"]
        alerts[r["alert"]] = r
    assert {"Mq9NodeDown", "Mq9NodesMissing", "Mq9SlotsUnavailable", "Mq9StorageFailing",
            "Mq9SlowConsumers", "Mq9NoRaftLeader"} <= set(alerts)
    assert alerts["Mq9NodesMissing"]["expr"].endswith("< 3")  # replicaCount


def test_prometheus_rule_values():
    pr = one(render({"replicaCount": 5, "metrics": {"prometheusRule": {
        "enabled": True, "namespace": "monitoring", "selector": 'service="mq9", env="prod"',
        "nodeDownMinutes": 7, "slowConsumersPer5m": 10,
        "additionalRules": [{"alert": "Mq9ManyConnections", "expr": "sum(mq9_connections) > 1e5",
                             "labels": {"severity": "warning"}}]}}}), "PrometheusRule")
    assert pr["metadata"]["namespace"] == "monitoring"
    rules = {r.get("alert"): r for r in pr["spec"]["groups"][0]["rules"]}
    assert rules["Mq9NodeDown"]["expr"] == 'up{service="mq9", env="prod"} == 0'
    assert rules["Mq9NodeDown"]["for"] == "7m"
    assert rules["Mq9SlowConsumers"]["expr"].endswith("[5m]) > 10")
    assert rules["Mq9NodesMissing"]["expr"].endswith("< 5")
    assert rules["Mq9ManyConnections"]["expr"] == "sum(mq9_connections) > 1e5"
    # off by default, like the ServiceMonitor: they need prometheus-operator's CRDs
    assert "PrometheusRule" not in {o["kind"] for docs in render().values() for o in docs
                                    if isinstance(o, dict)}


# ---- every metric on a live node ---------------------------------------------------------

def served_names(exposition: str) -> set[str]:
    return {re.match(r"[A-Za-z_:][\w:]*", line).group(0)
            for line in exposition.splitlines() if line and not line.startswith("#")}


def test_every_metric_used_exists_on_a_live_node(tmp_path):
    """A node as the chart runs it (cluster mode, its own Raft group), a little traffic of
    each kind; then every metric the dashboard and the alerts name must be on /metrics."""
    import nats
    from nodeproc import Node

    from loadtest.cluster_hop import free_port_block

    used = set().union(*(metric_names(e) for e in all_exprs())) - SCRAPE_SERIES
    node = Node(tmp_path / "node", env={"MQ9_CLUSTER_SECRET": "chart-monitoring-secret-0123"},
                cluster_port=free_port_block(5), node_id="mq9-0", advertise="127.0.0.1",
                ready_timeout=60)
    try:
        node.start()

        async def traffic():
            nc = await nats.connect(node.url, allow_reconnect=False, connect_timeout=10)
            try:
                box = json.loads((await nc.request(
                    "$mq9.AI.MAILBOX.CREATE", b'{"type": "standard", "ttl": 60}', timeout=10)).data)
                inbox = f"$mq9.AI.INBOX.{box['mail_id']}"
                await nc.request(f"{inbox}.normal", b'{"n": 1}', timeout=10)
                sub = await nc.subscribe(f"{inbox}.*")
                await sub.next_msg(timeout=10)
                plain = await nc.subscribe("chart.test")
                await nc.publish("chart.test", b"x")
                await plain.next_msg(timeout=10)
            finally:
                await nc.close()

        asyncio.run(traffic())
        served = served_names(node.metrics())
    finally:
        node.close()
    missing = sorted(used - served)
    assert not missing, f"used by the dashboard or the alerts, not on /metrics: {missing}"
