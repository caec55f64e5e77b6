"""Prometheus metrics and tracking events: every service serves its registry and its recent
events (secumail/tracking.py) on SECUMAIL_METRICS_LISTEN.

Metric objects live next to the code that updates them; this module only serves them.
Label values are always from small fixed sets (checks, actions, verdicts), never
addresses or domains, so that series stay bounded.

    GET /metrics               the exposition format
    GET /events?after=SEQ      this process's events numbered above SEQ, as JSON

Served on the service's event loop (secumail/protocols/http.py), not from a thread.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from secumail import tracking
from secumail.access import AllowedClients
from secumail.logs import log_event
from secumail.netaddr import HostPort
from secumail.protocols.http import NOT_FOUND, Answer, OneShotServer, Request

log = logging.getLogger("secumail.metrics")

# The classic text format, which every Prometheus reads (generate_latest writes it).
METRICS_TYPE = CONTENT_TYPE_PLAIN_0_0_4

BAD_CURSOR = Answer("400 Bad Request", b'{"detail": "after must be a number"}')
NOT_A_READER = Answer("403 Forbidden",
                      b'{"detail": "only SECUMAIL_TRACKING_READERS may read events"}')


def events_cursor(request: Request) -> int | None:
    """/events' `after` (0 when not given: all held), None when it is not a number."""
    after = request.parameter("after", "0")
    return int(after) if after.isdigit() and int(after) < 2**64 else None


async def may_read_events(readers: AllowedClients, request: Request) -> bool:
    """/events holds addresses: only the gateway (and loopback) may read it."""
    if await readers.allows(request.peer):
        return True
    log_event(log, "events refused", logging.WARNING, peer=request.peer or "?",
              readers=str(readers))
    return False


class MetricsAnswers:
    """What a service's metrics listener answers."""

    def __init__(self, events: tracking.EventLog, readers: list[str]) -> None:
        self.events = events
        self.readers = AllowedClients(readers)

    async def __call__(self, request: Request) -> Answer:
        if request.method != "GET":
            return NOT_FOUND
        if request.path == "/metrics":
            return Answer("200 OK", generate_latest(REGISTRY), METRICS_TYPE)
        if request.path == "/events":
            if not await may_read_events(self.readers, request):
                return NOT_A_READER
            after = events_cursor(request)
            return BAD_CURSOR if after is None else Answer("200 OK", self.events.since(after))
        return NOT_FOUND


async def start_metrics_listener(listen: HostPort, readers: list[str], timeout: float,
                                 events: tracking.EventLog = tracking.EVENTS
                                 ) -> asyncio.Server | None:
    """Serve /metrics and, to `readers`, /events on this event loop; port 0 turns it off."""
    if listen.port == 0:
        return None
    return await OneShotServer(MetricsAnswers(events, readers), timeout).listen(listen)
