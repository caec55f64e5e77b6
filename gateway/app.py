"""The gateway's FastAPI application: `create_app(settings)`.

Everything that talks to the outside (replica resolution, probes, HTTP scrapes, the
greylist store, SMTP for canaries and releases) is built here from the settings into the
context the routes share (context.py), or handed in by the tests. The routes are in
gateway/routers/, one module per area; the tokens guard them as they are included here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx2
from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway.auth import WrongTokens, client_of, token_guard
from gateway.canary import CanarySend, ChainProbe, ProbeMetrics
from gateway.context import Gateway, problem
from gateway.digest import DigestLinks, Digests
from gateway.dmarc_reports import DmarcReporter, ReportInbox
from gateway.health import HealthChecker, Hop, Namer, Resolver, chain_hops, reverse_name
from gateway.http import HostCheck
from gateway.outbound_notice import HoldNotifier, NoticeSend
from gateway.quarantine import Learn, QuarantineAdmin, ReleaseSend, next_hops
from gateway.routers import (
    console,
    digest,
    dkim,
    dmarc,
    greylist,
    health,
    learning,
    metrics,
    mta_sts,
    outbound,
    quarantine,
    tracking,
)
from gateway.scrape import Target, replica_targets
from gateway.spamassassin import SpamAssassinCollector
from gateway.tls_reports import TlsReporter
from gateway.tracking import Collector, TrackingMetrics, TrackingStore
from secumail import probes
from secumail.dmarc import TxtLookup
from secumail.dns import make_async_resolver
from secumail.greylist_store import GreylistStore, open_store
from secumail.logs import log_event
from secumail.protocols import spamc
from secumail.quarantine import Quarantine
from secumail.settings import Settings
from secumail.txt_lookup import async_txt_lookup

log = logging.getLogger("secumail.gateway")

HOLD_NOTICE_INTERVAL = 30.0  # seconds between two looks for held senders to tell of
FIRST_PROBE_AFTER = 60.0  # seconds: let the stack come up before the first canary
# Seconds between two looks for replicas to collect tracking events from (a health round).
TRACKING_TARGETS_MAX_AGE = 30.0
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: problem("Missing or wrong bearer token")}


def create_app(
    settings: Settings,
    *,
    resolve: Resolver = probes.replicas,
    namer: Namer = reverse_name,
    transport: httpx2.AsyncBaseTransport | None = None,
    store: Callable[[], GreylistStore] | None = None,
    hostname: str | None = None,
    hops: list[Hop] | None = None,
    canary_send: CanarySend | None = None,
    release_send: ReleaseSend | None = None,
    learn: Learn | None = None,
    clock: Callable[[], float] = time.time,
    tracking_store: TrackingStore | None = None,
    notice_send: NoticeSend | None = None,
    txt_lookup: TxtLookup | None = None,
) -> FastAPI:
    """The app; the keyword arguments replace what reaches the network (and the clock), for
    the tests."""
    registry = CollectorRegistry()
    registry.register(SpamAssassinCollector(settings.spamassassin_address))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    client = httpx2.AsyncClient(transport=transport)
    gateway = Gateway(
        settings=settings,
        checker=HealthChecker(hops or chain_hops(settings), settings.gateway_timeout,
                              resolve, namer, clock),
        client=client,
        probe=ChainProbe(settings, client, ProbeMetrics(registry), clock, canary_send),
        quarantine=QuarantineAdmin(Quarantine(settings.quarantine_dir), next_hops(settings),
                                   settings.hostname, settings.relay_timeout, release_send,
                                   learn or (lambda message, kind: spamc.learn(
                                       settings.spamassassin_address, message, kind,
                                       settings.relay_timeout))),
        registry=registry,
        instance=hostname or socket.gethostname(),
        open_store=store or (lambda: open_store(settings.greylist_store,
                                                settings.greylist_max_age,
                                                settings.redis_password_file,
                                                settings.greylist_retry_window)),
        requests=Counter("secumail_gateway_requests", "Gateway API requests by route and "
                         "status code", ["route", "code"], registry=registry),
        wrong_tokens=WrongTokens(settings.gateway_wrong_tokens,
                                 settings.gateway_wrong_token_window),
    )
    gateway.quarantine.track = gateway.track  # releases and learning, as tracking events
    if settings.dmarc_reports or settings.tlsrpt:  # the reporters' DNS, for them only
        lookup = txt_lookup or async_txt_lookup(
            make_async_resolver(settings.dns_servers, settings.dns_timeout))
    if settings.dmarc_reports:
        reports = Counter("secumail_dmarc_reports", "DMARC aggregate reports by result (sent, "
                          "failed: tried again next round, skipped: never)", ["result"],
                          registry=registry)
        gateway.dmarc = DmarcReporter(settings, lookup, reports, notice_send, clock)
    if settings.tlsrpt:
        tls_reports = Counter("secumail_tlsrpt_reports", "TLS reports (RFC 8460) by result "
                              "(sent, failed: tried again next round, skipped: never)",
                              ["result"], registry=registry)
        gateway.tls = TlsReporter(settings, lookup, tls_reports, notice_send, clock)
    if settings.dmarc_rua_address:
        gateway.inbox = ReportInbox(settings, registry, clock)
    if settings.quarantine_digest:
        if settings.admin_token.get_secret_value():  # its links are signed with it
            gateway.digest = Digests(settings, gateway.quarantine.quarantine,
                                     DigestLinks(settings.admin_token), notice_send, clock)
        else:
            log_event(log, "quarantine digests off: they need SECUMAIL_ADMIN_TOKEN (their "
                      "links are signed with a key made from it)", logging.ERROR)
    tracking_metrics = TrackingMetrics(registry)
    if settings.tracking:
        gateway.tracking = tracking_store or TrackingStore(
            settings.tracking_db, settings.tracking_retention_days * 86400,
            settings.tracking_max_events, search_events=settings.tracking_search_events,
            search_seconds=settings.tracking_search_seconds)

    async def event_sources() -> list[Target]:
        """Every replica that serves a metrics listener, as the health rounds found them."""
        results = await gateway.checker.latest(max_age=TRACKING_TARGETS_MAX_AGE)
        return replica_targets(results, settings.metrics_listen.port)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if settings.probe_interval > 0:
            tasks.append(asyncio.create_task(gateway.probe.every(
                settings.probe_interval, first=min(settings.probe_interval, FIRST_PROBE_AFTER)
            )))
        if settings.outbound:
            notifier = HoldNotifier(settings, gateway.outbound, notice_send)
            tasks.append(asyncio.create_task(notifier.every(HOLD_NOTICE_INTERVAL)))
        if gateway.digest is not None:
            tasks.append(asyncio.create_task(gateway.digest.every_day()))
        if gateway.dmarc is not None:
            tasks.append(asyncio.create_task(gateway.dmarc.every_day()))
        if gateway.tls is not None:
            tasks.append(asyncio.create_task(gateway.tls.every_day()))
        if gateway.inbox is not None:
            tasks.append(asyncio.create_task(gateway.inbox.every()))
        if gateway.tracking is not None:
            collector = Collector(gateway.tracking, client, event_sources,
                                  tracking_metrics, settings.gateway_timeout,
                                  stored=gateway.tls.count if gateway.tls else None)
            tasks.append(asyncio.create_task(collector.every(settings.tracking_interval)))
        yield
        for task in tasks:
            task.cancel()
        await gateway.close()

    app = FastAPI(
        title="SecuMail gateway",
        version="0.1.0",
        description=(
            "Health, Prometheus metrics and administration of the SecuMail chain. Admin "
            "routes need `Authorization: Bearer <SECUMAIL_ADMIN_TOKEN>`; health and metrics "
            "need `SECUMAIL_METRICS_TOKEN` the same way when it is set."
        ),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    # The MTA-STS policy is fetched as https://mta-sts.<domain>/ (through the admin's proxy).
    sts_names = [f"mta-sts.{d}" for d in settings.domains] if settings.mta_sts_mode else []
    # The digest's links open the gateway by the name users reach it by.
    digest_names = [urlsplit(settings.quarantine_digest_url).hostname or ""] \
        if gateway.digest is not None else []
    app.add_middleware(HostCheck, names=[*settings.gateway_hosts, settings.hostname,
                                         *sts_names, *digest_names])

    app.include_router(health.liveness)
    app.include_router(mta_sts.policy)
    app.include_router(digest.links)  # a user's link: signed, no token
    # Health and metrics: open, or guarded by the metrics token when one is set.
    guarded: dict[str, Any] = {}
    if settings.metrics_token.get_secret_value():
        guard = token_guard(settings.metrics_token, "MetricsToken", "SECUMAIL_METRICS_TOKEN",
                            gateway.wrong_tokens)
        guarded = {"dependencies": [Depends(guard)], "responses": UNAUTHORIZED}
    app.include_router(health.router, **guarded)
    app.include_router(metrics.router, **guarded)
    # The admin API exists only with an admin token.
    if settings.admin_token.get_secret_value():
        guard = token_guard(settings.admin_token, "AdminToken", "SECUMAIL_ADMIN_TOKEN",
                            gateway.wrong_tokens)
        for router in (health.run, greylist.router, quarantine.router, dkim.router,
                       tracking.router, learning.router, outbound.router, mta_sts.router,
                       digest.admin, dmarc.router, dmarc.tls):
            app.include_router(router, dependencies=[Depends(guard)], responses=UNAUTHORIZED)
        app.include_router(console.router)  # its own sign-in (a cookie), the same token
    else:
        log_event(log, "admin API off: SECUMAIL_ADMIN_TOKEN is not set", logging.WARNING)

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """One line per request, path without its query string (which may hold secrets)."""
        started = time.perf_counter()
        response = await call_next(request)
        route: Any = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        gateway.requests.labels(template, str(response.status_code)).inc()
        if template not in ("/metrics", "/healthz", "/readyz"):  # scraped every few seconds
            log_event(log, "request", method=request.method, path=request.url.path,
                      status=response.status_code,
                      ms=round((time.perf_counter() - started) * 1000, 1),
                      client=client_of(request))
        return response

    return app
