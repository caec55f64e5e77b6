"""The greylist: its triplets, and the whitelist (from the settings and added here)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import JSONResponse

from gateway.context import GatewayDep, StoreDep, invalid, problem
from gateway.models import GreylistEntry, Whitelist, WhitelistItem, WhitelistRequest
from secumail.greylist_store import (
    Triplet,
    TripletKey,
    WhitelistEntry,
    WhitelistKind,
    normalize_whitelist_entry,
)
from secumail.logs import log_event
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")
T = TypeVar("T")

STORE_DOWN: dict[int | str, dict[str, Any]] = {
    503: problem("The greylist store cannot be reached")}

router = APIRouter(prefix="/admin/greylist", tags=["greylist"], responses=STORE_DOWN)


async def in_store(call: Awaitable[T]) -> T:
    try:
        return await call
    except Exception as error:
        log_event(log, "greylist store failed", logging.ERROR, error=repr(error))
        raise HTTPException(503, "the greylist store failed") from None


def greylist_entry(key: str, entry: Triplet, settings: Settings, now: float) -> GreylistEntry:
    parts = TripletKey.from_text(key)
    return GreylistEntry(
        key=key, network=parts.network, sender=parts.sender, recipient=parts.recipient,
        first_seen=entry.first_seen, last_seen=entry.last_seen, passed=entry.passed,
        state=entry.state(now, settings.greylist_delay, settings.greylist_retry_window),
    )


@router.get("/entries", response_model=list[GreylistEntry],
            summary="Greylist triplets, most recently seen first")
async def list_entries(
    gateway: GatewayDep,
    store: StoreDep,
    limit: int = Query(100, ge=1, le=10000),
    match: str = Query("", max_length=320, description="Only keys containing this text"),
) -> list[GreylistEntry]:
    found = await in_store(store.entries(limit, match.lower()))
    now = time.time()
    return [greylist_entry(key, entry, gateway.settings, now) for key, entry in found]


@router.delete("/entries/{key:path}", status_code=204, response_class=Response,
               summary="Forget a triplet (its next attempt is greylisted again)",
               responses={404: problem("No such triplet")})
async def delete_entry(key: str, store: StoreDep) -> Response:
    if not await in_store(store.delete(key)):
        raise HTTPException(404, "no such greylist entry")
    log_event(log, "greylist entry deleted", key=key)
    return Response(status_code=204)


@router.get("/whitelist", response_model=Whitelist,
            summary="Clients and recipients never greylisted: from the settings, and added "
            "here")
async def get_whitelist(gateway: GatewayDep, store: StoreDep) -> Whitelist:
    settings = gateway.settings
    configured = [WhitelistItem(kind="client", value=v, added=None, source="settings")
                  for v in settings.greylist_whitelist_clients]
    configured += [WhitelistItem(kind="recipient", value=v, added=None, source="settings")
                   for v in [*settings.greylist_whitelist_recipients, settings.probe_address]]
    runtime = await in_store(store.whitelist())
    return Whitelist(entries=configured + [
        WhitelistItem(kind=e.kind, value=e.value, added=e.added, source="admin")
        for e in runtime
    ])


@router.post("/whitelist", response_model=WhitelistItem, status_code=201,
             summary="Never greylist a client or a recipient (the policy service sees it "
             "within 5 seconds)",
             responses={200: {"model": WhitelistItem, "description": "Already whitelisted"}})
async def add_whitelist(request: WhitelistRequest, store: StoreDep) -> Any:
    try:
        value = normalize_whitelist_entry(request.kind, request.value)
    except ValueError as error:
        raise invalid(("body", "value"), error) from None
    entry = WhitelistEntry(request.kind, value, time.time())
    added = await in_store(store.add_whitelist(entry))
    item = WhitelistItem(kind=entry.kind, value=value, added=entry.added, source="admin")
    if not added:
        return JSONResponse(item.model_dump(), status_code=200)
    log_event(log, "whitelisted", kind=entry.kind, value=value)
    return item


@router.delete("/whitelist/{kind}/{value:path}", status_code=204, response_class=Response,
               summary="Remove a whitelist entry added through the API",
               responses={404: problem("No such entry")})
async def delete_whitelist(kind: Literal["client", "recipient"], value: str,
                           store: StoreDep) -> Response:
    whitelist_kind: WhitelistKind = kind
    try:
        value = normalize_whitelist_entry(whitelist_kind, value)
    except ValueError:
        raise HTTPException(404, "no such whitelist entry") from None
    if not await in_store(store.remove_whitelist(whitelist_kind, value)):
        raise HTTPException(404, "no such whitelist entry")
    log_event(log, "whitelist entry removed", kind=kind, value=value)
    return Response(status_code=204)
