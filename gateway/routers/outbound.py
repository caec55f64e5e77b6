"""Outbound limits: the senders, clients and users held for sending far over their limits
(the policy service holds them, secumail/outbound.py), and their release."""

from __future__ import annotations

import logging
from typing import cast

from fastapi import APIRouter, HTTPException, Response

from gateway.context import OutboundDep, problem
from gateway.models import HeldSender
from gateway.routers.greylist import STORE_DOWN, in_store
from secumail.logs import log_event
from secumail.outbound import Held, Scope
from secumail.outbound_store import OutboundStore

log = logging.getLogger("secumail.gateway")

router = APIRouter(prefix="/admin/outbound", tags=["outbound"], responses=STORE_DOWN)


def held_sender(held: Held) -> HeldSender:
    return HeldSender(subject=held.subject, scope=cast(Scope, held.scope), value=held.value,
                      since=held.since, reason=held.reason, notified=held.notified)


@router.get("/held", response_model=list[HeldSender],
            summary="Senders, clients and users held: all their mail deferred (450) until "
            "released")
async def list_held(outbound: OutboundDep) -> list[HeldSender]:
    return [held_sender(held) for held in await in_store(outbound.holds())]


@router.delete("/held/{subject:path}", status_code=204, response_class=Response,
               summary="Release a held sender, client or user: its mail goes out again, "
               "within its limits", responses={404: problem("Nothing held by that name")})
async def release_held(subject: str, outbound: OutboundDep) -> Response:
    if not await release(outbound, subject, "api"):
        raise HTTPException(404, "nothing held by that name")
    return Response(status_code=204)


async def release(outbound: OutboundStore, subject: str, by: str) -> bool:
    """Release a hold (the API, the console): False when nothing was held by that name."""
    released = await in_store(outbound.release(subject))
    if released:
        log_event(log, "outbound hold released", subject=subject, by=by)
    return released
