"""Our own MTA-STS policy: the file senders fetch, and the DNS records the admin publishes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from gateway.context import GatewayDep, problem
from gateway.models import DnsRecord, MtaStsReport
from secumail import mta_sts
from secumail.settings import Settings

# Public: senders fetch it without a token (RFC 8461 3.3), over the admin's HTTPS proxy.
policy = APIRouter(tags=["mta-sts"])
router = APIRouter(prefix="/admin/mta-sts", tags=["mta-sts"])


def policy_of(settings: Settings) -> str:
    return mta_sts.policy_text(settings.mta_sts_mode, settings.mta_sts_hosts,
                               settings.mta_sts_max_age)


@policy.get("/.well-known/mta-sts.txt", response_class=PlainTextResponse,
            summary="Our MTA-STS policy (RFC 8461), when SECUMAIL_MTA_STS_MODE is set",
            responses={404: problem("No policy: SECUMAIL_MTA_STS_MODE is empty")})
async def mta_sts_policy(gateway: GatewayDep) -> PlainTextResponse:
    if not gateway.settings.mta_sts_mode:
        raise HTTPException(404, "no MTA-STS policy (SECUMAIL_MTA_STS_MODE is empty)")
    return PlainTextResponse(policy_of(gateway.settings), headers={
        "Cache-Control": "max-age=300"})


@router.get("", response_model=MtaStsReport,
            summary="The MTA-STS policy and the DNS records to publish for each domain")
async def mta_sts_records(gateway: GatewayDep) -> MtaStsReport:
    settings = gateway.settings
    text = policy_of(settings) if settings.mta_sts_mode else ""
    found = [DnsRecord(name=r.name, type=r.type, value=r.value, why=r.why)
             for domain in settings.domains
             for r in mta_sts.records(domain, text, settings.admin_mailbox,
                                      f"{settings.hostname}.")] if text else []
    return MtaStsReport(mode=settings.mta_sts_mode, policy=text, records=found)
