"""Prometheus metrics: every service exposes its registry on SECUMAIL_METRICS_LISTEN.

Metric objects live next to the code that updates them; this module only serves them.
Label values are always from small fixed sets (checks, actions, verdicts), never
addresses or domains, so that series stay bounded.
"""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from secumail.netaddr import HostPort

log = logging.getLogger("secumail.metrics")


def start_metrics_listener(listen: HostPort) -> None:
    """Serve /metrics from a background thread; port 0 turns the listener off."""
    if listen.port == 0:
        return
    start_http_server(listen.port, addr=listen.host)
