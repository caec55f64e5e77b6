"""What the gateway's routes share: settings, the health checker, the HTTP client, the
chain probe, the quarantine, the greylist store. Built once by `create_app` (app.py), kept
on the application, and handed to each route by FastAPI (`GatewayDep`)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import httpx2
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter

from gateway.auth import WrongTokens
from gateway.canary import ChainProbe
from gateway.digest import Digests
from gateway.dmarc_reports import DmarcReporter, ReportInbox
from gateway.health import HealthChecker
from gateway.models import Problem
from gateway.quarantine import QuarantineAdmin
from gateway.tls_reports import TlsReporter
from gateway.tracking import StoredEvent, TrackingStore
from secumail.greylist_store import GreylistStore
from secumail.logs import log_event
from secumail.outbound_store import OutboundStore, outbound_store
from secumail.settings import Settings
from secumail.tracking import Event

log = logging.getLogger("secumail.gateway")
T = TypeVar("T")


@dataclass
class Gateway:
    settings: Settings
    checker: HealthChecker
    client: httpx2.AsyncClient
    probe: ChainProbe
    quarantine: QuarantineAdmin
    registry: CollectorRegistry
    instance: str
    open_store: Callable[[], GreylistStore]
    requests: Counter
    wrong_tokens: WrongTokens
    tracking: TrackingStore | None = None  # None: tracking is off
    digest: Digests | None = None  # None: users' quarantine digests are off
    dmarc: DmarcReporter | None = None  # None: DMARC aggregate reports are off
    tls: TlsReporter | None = None  # None: TLS reports are off
    inbox: ReportInbox | None = None  # None: no address for others' reports
    _store: GreylistStore | None = field(default=None, repr=False)
    _outbound: OutboundStore | None = field(default=None, repr=False)

    def store(self) -> GreylistStore:
        """The greylist store, opened on first use (a missing volume must not stop the
        gateway from starting: only the greylist routes then answer 503)."""
        if self._store is None:
            self._store = self.open_store()
        return self._store

    def outbound(self) -> OutboundStore:
        """The outbound counters and held senders, beside the greylist in its store."""
        if self._outbound is None:
            self._outbound = outbound_store(self.store())
        return self._outbound

    async def track(self, event: Event) -> None:
        """Store one of the gateway's own events (a release, a learning act) beside those it
        collects from the replicas, at once (it is the store's one writer), this gateway
        named as its replica. Nothing when tracking is off; never raises: tracking must not
        undo or refuse what the admin did."""
        if self.tracking is None:
            return
        try:
            await asyncio.to_thread(self.tracking.add_own, [StoredEvent(event, self.instance)])
        except (OSError, sqlite3.Error) as error:
            log_event(log, "tracking event not stored", logging.WARNING, outcome=event.outcome,
                      error=f"{type(error).__name__}: {error}")

    async def close(self) -> None:
        await self.client.aclose()
        if self.tracking is not None:
            self.tracking.close()
        if self._store is not None:
            await self._store.close()


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _opened(open_it: Callable[[], T]) -> T:
    """The greylist store (or what lives beside it), or 503 when it cannot be opened."""
    try:
        return open_it()
    except Exception as error:
        log_event(log, "greylist store unavailable", logging.ERROR, error=repr(error))
        raise HTTPException(503, "the greylist store cannot be opened") from None


async def get_store(gateway: GatewayDep) -> GreylistStore:
    return _opened(gateway.store)


StoreDep = Annotated[GreylistStore, Depends(get_store)]


async def get_outbound(gateway: GatewayDep) -> OutboundStore:
    return _opened(gateway.outbound)


OutboundDep = Annotated[OutboundStore, Depends(get_outbound)]


def invalid(where: tuple[str, ...], error: ValueError) -> RequestValidationError:
    """A value the schema allows but the service does not: the same 422 FastAPI gives for
    a schema error, so that one documented shape covers both."""
    return RequestValidationError([{"loc": where, "msg": str(error), "type": "value_error"}])


def problem(description: str) -> dict[str, Any]:
    """An error response for the OpenAPI document."""
    return {"model": Problem, "description": description}
