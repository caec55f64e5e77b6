"""DMARC aggregate reports: send the pending ones now (the daily round does it after midnight
UTC)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from gateway.context import GatewayDep, problem
from gateway.models import DmarcReportRound

router = APIRouter(prefix="/admin/dmarc", tags=["dmarc"])


@router.post("/reports", response_model=DmarcReportRound,
             summary="Send every DMARC aggregate report not sent yet (days before today)",
             responses={409: problem("DMARC reports are off (SECUMAIL_DMARC_REPORTS)")})
async def send_reports(gateway: GatewayDep) -> DmarcReportRound:
    if gateway.dmarc is None:
        raise HTTPException(409, "DMARC reports are off (SECUMAIL_DMARC_REPORTS)")
    done = await gateway.dmarc.run()
    return DmarcReportRound(sent=done.sent, failed=done.failed, skipped=done.skipped)
