"""The admin API: greylist, quarantine, DKIM keys. Every route needs the admin token."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.auth import Guard
from gateway.models import (
    DkimActivation,
    DkimKey,
    GreylistEntry,
    KeygenReport,
    KeygenRequest,
    Problem,
    QuarantineDetail,
    QuarantineItem,
    ReleaseFailure,
    ReleaseReport,
    Whitelist,
    WhitelistItem,
    WhitelistRequest,
)
from gateway.quarantine import ReleaseRefused
from secumail.logs import log_event
from services.dkim import keys
from services.policy.greylist import (
    Triplet,
    WhitelistEntry,
    WhitelistKind,
    normalize_whitelist_entry,
)
from services.policy.stores import GreylistStore

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("secumail.gateway")


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


Responses = dict[int | str, dict[str, Any]]
def invalid(where: tuple[str, ...], error: ValueError) -> RequestValidationError:
    """A value the schema allows but the service does not: the same 422 FastAPI gives for
    a schema error, so that one documented shape covers both."""
    return RequestValidationError([{"loc": where, "msg": str(error), "type": "value_error"}])


UNAUTHORIZED: Responses = {401: _problem("Missing or wrong bearer token")}
STORE_DOWN: Responses = {503: _problem("The greylist store cannot be reached")}


def greylist_entry(key: str, entry: Triplet) -> GreylistEntry:
    # network/sender/recipient, where the network itself holds a slash (192.0.2.0/24).
    address, _, prefix_rest = key.partition("/")
    prefix, _, rest = prefix_rest.partition("/")
    sender, _, recipient = rest.rpartition("/")
    return GreylistEntry(
        key=key, network=f"{address}/{prefix}", sender=sender, recipient=recipient,
        first_seen=entry.first_seen, last_seen=entry.last_seen, passed=entry.passed,
    )


def router(gateway: Gateway, guard: Guard) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(guard)], responses=UNAUTHORIZED)

    async def store() -> GreylistStore:
        try:
            return gateway.store()
        except Exception as error:
            log_event(log, "greylist store unavailable", logging.ERROR, error=repr(error))
            raise HTTPException(503, "the greylist store cannot be opened") from None

    async def in_store(call: Any) -> Any:
        try:
            return await call
        except Exception as error:
            log_event(log, "greylist store failed", logging.ERROR, error=repr(error))
            raise HTTPException(503, "the greylist store failed") from None

    # --- greylist ------------------------------------------------------------------------

    @api.get("/greylist/entries", response_model=list[GreylistEntry], tags=["greylist"],
             summary="Greylist triplets, most recently seen first", responses=STORE_DOWN)
    async def list_entries(
        limit: int = Query(100, ge=1, le=10000),
        match: str = Query("", max_length=320, description="Only keys containing this text"),
    ) -> list[GreylistEntry]:
        found = await in_store((await store()).entries(limit, match.lower()))
        return [greylist_entry(key, entry) for key, entry in found]

    @api.delete("/greylist/entries/{key:path}", status_code=204, response_class=Response,
                tags=["greylist"], summary="Forget a triplet (its next attempt is greylisted "
                "again)", responses={404: _problem("No such triplet"), **STORE_DOWN})
    async def delete_entry(key: str) -> Response:
        if not await in_store((await store()).delete(key)):
            raise HTTPException(404, "no such greylist entry")
        log_event(log, "greylist entry deleted", key=key)
        return Response(status_code=204)

    @api.get("/greylist/whitelist", response_model=Whitelist, tags=["greylist"],
             summary="Clients and recipients never greylisted: from the settings, and added "
             "here", responses=STORE_DOWN)
    async def get_whitelist() -> Whitelist:
        settings = gateway.settings
        configured = [WhitelistItem(kind="client", value=v, added=None, source="settings")
                      for v in settings.greylist_whitelist_clients]
        configured += [WhitelistItem(kind="recipient", value=v, added=None, source="settings")
                       for v in [*settings.greylist_whitelist_recipients,
                                 settings.probe_address]]
        runtime = await in_store((await store()).whitelist())
        return Whitelist(entries=configured + [
            WhitelistItem(kind=e.kind, value=e.value, added=e.added, source="admin")
            for e in runtime
        ])

    @api.post("/greylist/whitelist", response_model=WhitelistItem, status_code=201,
              tags=["greylist"], summary="Never greylist a client or a recipient (the policy "
              "service sees it within 5 seconds)",
              responses={200: {"model": WhitelistItem, "description": "Already whitelisted"},
                         **STORE_DOWN})
    async def add_whitelist(request: WhitelistRequest) -> Any:
        try:
            value = normalize_whitelist_entry(request.kind, request.value)
        except ValueError as error:
            raise invalid(("body", "value"), error) from None
        entry = WhitelistEntry(request.kind, value, time.time())
        added = await in_store((await store()).add_whitelist(entry))
        item = WhitelistItem(kind=entry.kind, value=value, added=entry.added, source="admin")
        if not added:
            return JSONResponse(item.model_dump(), status_code=200)
        log_event(log, "whitelisted", kind=entry.kind, value=value)
        return item

    @api.delete("/greylist/whitelist/{kind}/{value:path}", status_code=204,
                response_class=Response, tags=["greylist"],
                summary="Remove a whitelist entry added through the API",
                responses={404: _problem("No such entry"), **STORE_DOWN})
    async def delete_whitelist(kind: Literal["client", "recipient"], value: str) -> Response:
        whitelist_kind: WhitelistKind = kind
        try:
            value = normalize_whitelist_entry(whitelist_kind, value)
        except ValueError:
            raise HTTPException(404, "no such whitelist entry") from None
        if not await in_store((await store()).remove_whitelist(whitelist_kind, value)):
            raise HTTPException(404, "no such whitelist entry")
        log_event(log, "whitelist entry removed", kind=kind, value=value)
        return Response(status_code=204)

    # --- quarantine ----------------------------------------------------------------------

    quarantine = gateway.quarantine

    @api.get("/quarantine", response_model=list[QuarantineItem], tags=["quarantine"],
             summary="Quarantined messages, newest first")
    async def list_quarantine(
        filter: str | None = Query(None, pattern=r"^[a-z0-9_-]{1,32}$",
                                   description="Only what this filter kept: clamav, spamd"),
        limit: int = Query(100, ge=1, le=10000),
    ) -> list[QuarantineItem]:
        items = []
        for record in await asyncio.to_thread(quarantine.records, filter, limit):
            try:
                items.append(QuarantineItem.model_validate(record))
            except ValidationError:  # a record written by hand, or by an older version
                log_event(log, "unreadable quarantine record", logging.WARNING,
                          id=str(record.get("id", "?")))
        return items

    @api.get("/quarantine/{ident}", response_model=QuarantineDetail, tags=["quarantine"],
             summary="One quarantined message: envelope, verdict, headers",
             responses={404: _problem("No such message")})
    async def show_quarantine(ident: str) -> QuarantineDetail:
        record = await asyncio.to_thread(quarantine.record, ident)
        message = await asyncio.to_thread(quarantine.message, ident)
        if record is None or message is None:
            raise HTTPException(404, "no such quarantined message")
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            message)
        headers = [(name, " ".join(str(value).split())) for name, value in parsed.items()]
        return QuarantineDetail.model_validate({**record, "headers": headers})

    @api.get("/quarantine/{ident}/message", response_class=Response, tags=["quarantine"],
             summary="The quarantined message itself",
             responses={200: {"content": {"message/rfc822": {}},
                              "description": "The message as the filter received it"},
                        404: _problem("No such message")})
    async def raw_quarantine(ident: str) -> Response:
        message = await asyncio.to_thread(quarantine.message, ident)
        if message is None:
            raise HTTPException(404, "no such quarantined message")
        return Response(message, media_type="message/rfc822")

    @api.post("/quarantine/{ident}/release", response_model=ReleaseReport, tags=["quarantine"],
              summary="Deliver a quarantined message, past the filter that kept it",
              responses={404: _problem("No such message"),
                         502: {"model": ReleaseFailure,
                               "description": "The next hop refused the message; it stays "
                               "in quarantine"}})
    async def release_quarantine(ident: str) -> Any:
        try:
            released = await quarantine.release(ident)
        except ReleaseRefused as error:
            log_event(log, "release refused", logging.WARNING, id=ident, step=error.step,
                      reply=error.reply[:200])
            failure = ReleaseFailure(detail="the next hop refused the message",
                                     step=error.step, reply=error.reply)
            return JSONResponse(failure.model_dump(), status_code=502)
        if released is None:
            raise HTTPException(404, "no such quarantined message")
        log_event(log, "released", id=ident, next_hop=released.next_hop)
        return ReleaseReport(id=ident, released=True, next_hop=released.next_hop,
                             reply=released.reply)

    @api.delete("/quarantine/{ident}", status_code=204, response_class=Response,
                tags=["quarantine"], summary="Delete a quarantined message for good",
                responses={404: _problem("No such message")})
    async def delete_quarantine(ident: str) -> Response:
        if not await asyncio.to_thread(quarantine.delete, ident):
            raise HTTPException(404, "no such quarantined message")
        log_event(log, "quarantined message deleted", id=ident)
        return Response(status_code=204)

    # --- DKIM ----------------------------------------------------------------------------

    keys_dir = Path(gateway.settings.dkim_keys_dir)

    @api.get("/dkim/keys", response_model=list[DkimKey], tags=["dkim"],
             summary="Every domain's selectors, which sign, and the DNS record to publish")
    async def list_dkim() -> list[DkimKey]:
        listed = await asyncio.to_thread(keys.list_keys, keys_dir)
        return [
            DkimKey(domain=k.domain, selector=k.selector, key_type=k.key_type, active=k.active,
                    record_name=f"{k.selector}._domainkey.{k.domain}",
                    record_value=k.record_value, error=k.error or None)
            for k in listed
        ]

    @api.post("/dkim/keys", response_model=KeygenReport, status_code=201, tags=["dkim"],
              summary="Generate a key; publish its record, then activate it",
              responses={409: _problem("That selector exists already")})
    async def generate_dkim(request: KeygenRequest) -> KeygenReport:
        try:
            made = await asyncio.to_thread(
                keys.keygen, keys_dir, request.domain, request.selector, request.key_type,
                request.bits, request.activate,
            )
        except FileExistsError:
            raise HTTPException(409, "that selector exists already for this domain") from None
        except ValueError as error:
            raise invalid(("body",), error) from None
        selector, _, domain = made.record_name.partition("._domainkey.")
        log_event(log, "dkim key generated", domain=domain, selector=selector,
                  type=request.key_type, activated=made.activated)
        return KeygenReport(domain=domain, selector=selector, key_type=request.key_type,
                            activated=made.activated, record_name=made.record_name,
                            record_value=made.record_value, zone_line=made.zone_line)

    @api.post("/dkim/keys/{domain}/{selector}/activate", response_model=DkimActivation,
              tags=["dkim"], summary="Sign with this selector from now on (the milter sees it "
              "within a second)", responses={404: _problem("No such key")})
    async def activate_dkim(domain: str, selector: str) -> DkimActivation:
        try:
            domain, selector = keys.check_domain(domain), keys.check_selector(selector)
            active = await asyncio.to_thread(keys.activate, keys_dir, domain, selector)
        except keys.KeyUnusable:
            raise HTTPException(404, "no usable key with that selector") from None
        except ValueError as error:
            raise invalid(("path",), error) from None
        log_event(log, "dkim key activated", domain=domain, selector=selector)
        return DkimActivation(domain=domain, active=active)

    return api
