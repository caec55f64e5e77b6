"""Prometheus metrics and tracking events: every service serves its registry and its recent
events (secumail/tracking.py) on SECUMAIL_METRICS_LISTEN.

Metric objects live next to the code that updates them; this module only serves them.
Label values are always from small fixed sets (checks, actions, verdicts), never
addresses or domains, so that series stay bounded.

    GET /metrics               the exposition format
    GET /events?after=SEQ      this process's events numbered above SEQ, as JSON
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from secumail import tracking
from secumail.access import AllowedClients
from secumail.logs import log_event
from secumail.netaddr import HostPort

log = logging.getLogger("secumail.metrics")

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scraped every few seconds: no access log."""


def events_answer(events: tracking.EventLog, query: str) -> tuple[str, bytes]:
    """The status and JSON body of `/events?after=SEQ` (SEQ defaults to 0: all held)."""
    values = parse_qs(query).get("after", ["0"])
    try:
        after = int(values[0])
    except ValueError:
        return "400 Bad Request", b'{"detail": "after must be an integer"}'
    return "200 OK", events.since(after)


class Readers:
    """AllowedClients for the listener's threads: each asks on an event loop of its own,
    one at a time (the names are resolved once for all, and again every 30 s)."""

    def __init__(self, entries: list[str]) -> None:
        self.clients = AllowedClients(entries)
        self.lock = threading.Lock()

    def allows(self, address: str) -> bool:
        with self.lock:
            return asyncio.run(self.clients.allows(address))


def metrics_app(events: tracking.EventLog, readers: Readers | None = None
                ) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/events":
            if readers is not None and not readers.allows(environ.get("REMOTE_ADDR", "")):
                log_event(log, "events refused", logging.WARNING,
                          peer=environ.get("REMOTE_ADDR", "?"), readers=str(readers.clients))
                start_response("403 Forbidden", [("Content-Type", "application/json")])
                return [b'{"detail": "only SECUMAIL_TRACKING_READERS may read events"}']
            status, body = events_answer(events, environ.get("QUERY_STRING", ""))
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_metrics_listener(listen: HostPort, readers: list[str],
                           events: tracking.EventLog = tracking.EVENTS) -> None:
    """Serve /metrics and, to `readers`, /events from a background thread; port 0 turns
    it off."""
    if listen.port == 0:
        return

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET

    server = make_server(listen.host, listen.port, metrics_app(events, Readers(readers)), Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
