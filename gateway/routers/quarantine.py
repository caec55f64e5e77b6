"""The quarantine: list, show, download, release past the filter that kept it, delete."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import JSONResponse

from gateway.context import Gateway, GatewayDep, problem
from gateway.models import (
    LearnReport,
    QuarantineDetail,
    QuarantineItem,
    ReleaseFailure,
    ReleaseReport,
)
from gateway.preview import preview, subject
from gateway.quarantine import ReleaseRefused
from secumail.logs import log_event
from secumail.protocols.spamc import Kind
from secumail.quarantine import Quarantine, QuarantineRecord

log = logging.getLogger("secumail.gateway")

router = APIRouter(prefix="/admin/quarantine", tags=["quarantine"])
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem("No such message")}


def item(record: QuarantineRecord, head: bytes) -> QuarantineItem:
    """A listed record, with the Subject of its message (`head`: the message's start)."""
    return QuarantineItem.model_validate({**asdict(record), "subject": subject(head)})


def _unreadable(ident: str) -> None:
    log_event(log, "unreadable quarantine record", logging.WARNING, id=ident)


def listed(store: Quarantine, filter_name: str | None, limit: int) -> list[QuarantineItem]:
    """The newest `limit` records, each with its Subject: of each listed message only its
    header block is read, 64 KiB at most (`Quarantine.head`), whatever the quarantine holds."""
    return [item(record, store.head(record))
            for record in store.records(filter_name, limit, _unreadable)]


@router.get("", response_model=list[QuarantineItem], summary="Quarantined messages, newest first")
async def list_quarantine(
    gateway: GatewayDep,
    filter: str | None = Query(None, pattern=r"^[a-z0-9_-]{1,32}$",
                               description="Only what this filter kept: clamav, spamd"),
    limit: int = Query(100, ge=1, le=10000),
) -> list[QuarantineItem]:
    return await asyncio.to_thread(listed, gateway.quarantine.quarantine, filter, limit)


@router.get("/{ident}", response_model=QuarantineDetail,
            summary="One quarantined message: envelope, verdict, headers, a text preview",
            responses=NOT_FOUND)
async def show_quarantine(ident: str, gateway: GatewayDep) -> QuarantineDetail:
    store = gateway.quarantine.quarantine
    record = await asyncio.to_thread(store.record, ident)
    message = await asyncio.to_thread(store.message, ident)
    if record is None or message is None:
        raise HTTPException(404, "no such quarantined message")
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    headers = [(name, " ".join(str(value).split())) for name, value in parsed.items()]
    shown = await asyncio.to_thread(preview, message)  # bounded, still ~0.3 s at worst
    return QuarantineDetail.model_validate({**asdict(record), "subject": subject(message),
                                            "headers": headers, "preview": asdict(shown)})


@router.get("/{ident}/message", response_class=Response,
            summary="The quarantined message itself",
            responses={200: {"content": {"message/rfc822": {}},
                             "description": "The message as the filter received it"},
                       **NOT_FOUND})
async def raw_quarantine(ident: str, gateway: GatewayDep) -> Response:
    message = await asyncio.to_thread(gateway.quarantine.quarantine.message, ident)
    if message is None:
        raise HTTPException(404, "no such quarantined message")
    return Response(message, media_type="message/rfc822")


@router.post("/{ident}/release", response_model=ReleaseReport,
             summary="Deliver a quarantined message, past the filter that kept it",
             responses={**NOT_FOUND,
                        502: {"model": ReleaseFailure,
                              "description": "The next hop refused the message; it stays in "
                              "quarantine"}})
async def release_quarantine(
    ident: str, gateway: GatewayDep,
    learn: bool = Query(True, description="Teach SpamAssassin's Bayes the message is ham "
                        "(false: release without learning)"),
) -> Any:
    return await release(gateway, ident, learn, "API")


async def release(gateway: Gateway, ident: str, learn: bool, via: str
                  ) -> ReleaseReport | JSONResponse:
    """The release, asked for `via` the API or the console (tracking says which)."""
    try:
        released = await gateway.quarantine.release(ident, learn, via)
    except ReleaseRefused as error:
        log_event(log, "release refused", logging.WARNING, id=ident, step=error.step,
                  reply=error.reply[:200])
        failure = ReleaseFailure(detail="the next hop refused the message", step=error.step,
                                 reply=error.reply)
        return JSONResponse(failure.model_dump(), status_code=502)
    if released is None:
        raise HTTPException(404, "no such quarantined message")
    log_event(log, "released", id=ident, next_hop=released.next_hop, learned=released.learned)
    return ReleaseReport(id=ident, released=True, next_hop=released.next_hop,
                         reply=released.reply, learned=released.learned)


@router.post("/{ident}/learn", response_model=LearnReport,
             summary="Teach SpamAssassin's Bayes a quarantined message's kind, and keep it",
             responses=NOT_FOUND)
async def learn_quarantined(
    ident: str, gateway: GatewayDep,
    kind: Annotated[Kind, Query(description="spam: rightly kept; ham: wrongly")],
) -> LearnReport:
    return await learn(gateway, ident, kind, "API")


async def learn(gateway: Gateway, ident: str, kind: Kind, via: str) -> LearnReport:
    """Teaching a kept message, asked for `via` the API or the console (its record, when
    readable, links the event to the message's path)."""
    store = gateway.quarantine.quarantine
    message = await asyncio.to_thread(store.message, ident)
    if message is None:
        raise HTTPException(404, "no such quarantined message")
    record = await asyncio.to_thread(store.record, ident)
    return LearnReport(kind=kind, learned=await gateway.quarantine.teach(
        message, kind, f"the admin, quarantined {ident} ({via})", record))


@router.delete("/{ident}", status_code=204, response_class=Response,
               summary="Delete a quarantined message for good", responses=NOT_FOUND)
async def delete_quarantine(ident: str, gateway: GatewayDep) -> Response:
    if not await asyncio.to_thread(gateway.quarantine.quarantine.delete, ident):
        raise HTTPException(404, "no such quarantined message")
    log_event(log, "quarantined message deleted", id=ident)
    return Response(status_code=204)
