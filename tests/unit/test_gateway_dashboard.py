"""The Grafana dashboard shipped with the gateway: every series a panel asks for is one the
stack exports (tests/e2e/test_gateway.py runs each query in a real Prometheus)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry

import secumail.filter.metrics
import services.dkim.server
import services.policy.server
from gateway.app import create_app
from secumail.netaddr import parse_network
from secumail.settings import Settings
from services.postfix.exporter import LogStats, QueueCollector

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_SERIES = {"secumail_up", "secumail_service_ready", "secumail_replica_ready",
                  "secumail_replica_probe_duration_seconds"}
assert secumail.filter.metrics and services.dkim.server and services.policy.server  # their metrics


def exported_names() -> set[str]:
    """Every metric family the services, the Postfix agent and the gateway define."""
    registries = [REGISTRY, CollectorRegistry()]
    LogStats(registries[1], "clamav", parse_network("10.0.0.0/8"))
    registries[1].register(QueueCollector(ROOT, threading.Event()))
    app = create_app(Settings(probe_interval=0, tracking_db=":memory:"), hostname="test")
    registries.append(app.state.gateway.registry)
    names = set(GATEWAY_SERIES)
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
    return names


def test_every_dashboard_series_is_exported() -> None:
    dashboard = json.loads((ROOT / "gateway/grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    names = exported_names()
    for expr in expressions:
        for used in re.findall(r"\bsecumail_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", used)
            assert base in names or used in names, (used, expr)


def test_panels_do_not_overlap() -> None:
    dashboard = json.loads((ROOT / "gateway/grafana-dashboard.json").read_text())
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
        assert grid["x"] + grid["w"] <= 24
