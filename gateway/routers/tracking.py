"""Where did my mail go? Each message's path through the chain, found by one search."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Query

from gateway.context import GatewayDep, problem
from gateway.tracking import Search

router = APIRouter(prefix="/admin/tracking", tags=["tracking"])


@router.get(
    "", summary="Messages by sender, recipient, client, Message-ID or queue id",
    description="Each message one of whose events matches every criterion given, newest "
    "first: its path hop by hop (service, replica, outcome, why, queue ids) and where it "
    "ended (delivered, bounced, refused, greylisted, deferred, quarantined, dropped...). "
    "Refusals before a queue id (greylisting, SPF, DNSBL, relay) are found too. One search "
    "reads a bounded number of events in a bounded time: `truncated` says when it stopped "
    "short of every message matching, `cut` why (narrow it to see the rest).",
    responses={400: problem("No criterion given"), 503: problem("Tracking is off")},
)
async def search(
    gateway: GatewayDep,
    sender: str = Query("", max_length=320), recipient: str = Query("", max_length=320),
    client: str = Query("", max_length=64), message_id: str = Query("", max_length=512),
    queue_id: str = Query("", max_length=64),
    since: float = Query(0.0, ge=0, description="Unix time; default: the retention's start"),
    until: float = Query(0.0, ge=0, description="Unix time; default: now"),
    limit: int = Query(50, ge=1, le=500),
) -> dict[str, Any]:
    if gateway.tracking is None:
        raise HTTPException(503, "tracking is off (SECUMAIL_TRACKING=false)")
    criteria = {"sender": sender, "recipient": recipient, "client": client,
                "message_id": message_id, "queue_id": queue_id}
    if not any(criteria.values()):
        raise HTTPException(400, "give a sender, recipient, client, message_id or queue_id")
    wanted = Search(**criteria, since=since, until=until or float("inf"), limit=limit)
    found = await asyncio.to_thread(gateway.tracking.find, wanted)
    return {"messages": [t.to_dict() for t in found.traces], "truncated": bool(found.cut),
            "cut": found.why}
