"""The gateway's FastAPI application: `create_app(settings)`.

Everything that talks to the outside (replica resolution, probes, HTTP scrapes, the
greylist store) is built here from the settings, or handed in by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import api_admin, api_health
from gateway.auth import token_guard
from gateway.canary import CanarySend, ChainProbe, ProbeMetrics
from gateway.health import HealthChecker, Hop, Namer, Resolver, chain_hops, reverse_name
from gateway.http import HostCheck
from gateway.quarantine import QuarantineAdmin, ReleaseSend, next_hops
from secumail import probes
from secumail.logs import log_event
from secumail.settings import Settings
from services.policy.stores import GreylistStore, open_store

log = logging.getLogger("secumail.gateway")

FIRST_PROBE_AFTER = 60.0  # seconds: let the stack come up before the first canary


@dataclass
class Gateway:
    """What the routes share."""

    settings: Settings
    checker: HealthChecker
    client: httpx2.AsyncClient
    probe: ChainProbe
    quarantine: QuarantineAdmin
    registry: CollectorRegistry
    instance: str
    open_store: Callable[[], GreylistStore]
    requests: Counter
    _store: GreylistStore | None = field(default=None, repr=False)

    def store(self) -> GreylistStore:
        """The greylist store, opened on first use (a missing volume must not stop the
        gateway from starting: only the greylist routes then answer 503)."""
        if self._store is None:
            self._store = self.open_store()
        return self._store


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
) -> FastAPI:
    """The app; the keyword arguments replace what reaches the network, for the tests."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    client = httpx2.AsyncClient(transport=transport)
    gateway = Gateway(
        settings=settings,
        checker=HealthChecker(hops or chain_hops(settings), settings.gateway_timeout,
                              resolve, namer),
        client=client,
        probe=ChainProbe(settings, client, ProbeMetrics(registry), send=canary_send),
        quarantine=QuarantineAdmin(settings.quarantine_dir, next_hops(settings),
                                   settings.hostname, settings.relay_timeout, release_send),
        registry=registry,
        instance=hostname or socket.gethostname(),
        open_store=store or (lambda: open_store(settings.greylist_store,
                                                settings.greylist_max_age,
                                                settings.redis_password_file)),
        requests=Counter("secumail_gateway_requests", "Gateway API requests by route and "
                         "status code", ["route", "code"], registry=registry),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        periodic = None
        if settings.probe_interval > 0:
            periodic = asyncio.create_task(gateway.probe.every(
                settings.probe_interval, first=min(settings.probe_interval, FIRST_PROBE_AFTER)
            ))
        yield
        if periodic is not None:
            periodic.cancel()
        await client.aclose()
        if gateway._store is not None:
            await gateway._store.close()

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
    app.add_middleware(HostCheck, names=[*settings.gateway_hosts, settings.hostname])
    metrics_guard = (token_guard(settings.metrics_token, "MetricsToken",
                                 "SECUMAIL_METRICS_TOKEN")
                     if settings.metrics_token.get_secret_value() else None)
    app.include_router(api_health.router(gateway, metrics_guard))
    if settings.admin_token.get_secret_value():
        admin_guard = token_guard(settings.admin_token, "AdminToken", "SECUMAIL_ADMIN_TOKEN")
        app.include_router(api_health.probe_router(gateway, admin_guard))
        app.include_router(api_admin.router(gateway, admin_guard))
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
                      client=request.client.host if request.client else "?")
        return response

    return app
