"""DMARC aggregate reports: send ours now (the daily round does it after midnight UTC), and
what other receivers' DMARC and TLS-RPT reports say about our domains."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Query

from gateway.context import Gateway, GatewayDep, problem
from gateway.dmarc_reports import DmarcReporter
from gateway.models import DmarcReportRound, ReceivedReports, ReportedSender, ReportedTls

router = APIRouter(prefix="/admin/dmarc", tags=["dmarc"])
tls = APIRouter(prefix="/admin/tls", tags=["tls"])


@router.post("/reports", response_model=DmarcReportRound,
             summary="Send every DMARC aggregate report not sent yet (days before today)",
             responses={409: problem("DMARC reports are off (SECUMAIL_DMARC_REPORTS)")})
async def send_reports(gateway: GatewayDep) -> DmarcReportRound:
    return await report_round(gateway.dmarc, "DMARC reports are off (SECUMAIL_DMARC_REPORTS)")


@tls.post("/reports", response_model=DmarcReportRound,
          summary="Send every TLS report (RFC 8460) not sent yet (days before today)",
          responses={409: problem("TLS reports are off (SECUMAIL_TLSRPT)")})
async def send_tls_reports(gateway: GatewayDep) -> DmarcReportRound:
    return await report_round(gateway.tls, "TLS reports are off (SECUMAIL_TLSRPT)")


async def report_round(reporter: DmarcReporter | None, off: str) -> DmarcReportRound:
    """A reporter's round now (409 when its setting is off)."""
    if reporter is None:
        raise HTTPException(409, off)
    done = await reporter.run()
    return DmarcReportRound(sent=done.sent, failed=done.failed, skipped=done.skipped)


@router.get("/received", response_model=ReceivedReports,
            summary="Who sends as our domains: what other receivers' reports say",
            responses={409: problem("No report address (SECUMAIL_DMARC_RUA_ADDRESS)")})
async def received(gateway: GatewayDep,
                   days: int = Query(7, ge=1, le=90, description="reports of this many days"),
                   ) -> ReceivedReports:
    return await received_reports(gateway, days)


async def received_reports(gateway: Gateway, days: int) -> ReceivedReports:
    """The API's answer, and the console page's table."""
    if gateway.inbox is None:
        raise HTTPException(409, "no report address (SECUMAIL_DMARC_RUA_ADDRESS)")
    since = time.time() - days * 86400
    store = await asyncio.to_thread(gateway.inbox.store)
    senders = await asyncio.to_thread(store.senders, since, gateway.settings.domains)
    tls = await asyncio.to_thread(store.tls, since)
    return ReceivedReports(
        since=since, senders=[ReportedSender(**asdict(s)) for s in senders],
        tls=[ReportedTls(policy_domain=d, policy_type=t, reporter=r, successes=ok,
                         failures=bad) for d, t, r, ok, bad in tls])
