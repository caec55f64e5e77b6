"""Teaching SpamAssassin's Bayes from a message the admin uploads: a spam that was delivered,
or a wanted message that was refused (its sender's copy, or one a user forwarded)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from gateway.context import GatewayDep, invalid, problem
from gateway.models import LearnReport
from secumail.protocols.spamc import Kind

router = APIRouter(prefix="/admin/learn", tags=["learning"])
MAX_MESSAGE = 10 * 1024 * 1024  # SECUMAIL_MESSAGE_SIZE_LIMIT's default: no mail is larger


@router.post("/{kind}", response_model=LearnReport,
             summary="Teach SpamAssassin's Bayes that this message (the request's body, as "
             "raw RFC 5322 text) is spam or ham",
             responses={413: problem("Larger than any mail")})
async def learn_uploaded(kind: Kind, request: Request,
                         gateway: GatewayDep) -> LearnReport:
    if int(request.headers.get("content-length") or 0) > MAX_MESSAGE:
        raise HTTPException(413, f"a message is at most {MAX_MESSAGE} bytes")
    message = b""
    async for chunk in request.stream():
        message += chunk
        if len(message) > MAX_MESSAGE:
            raise HTTPException(413, f"a message is at most {MAX_MESSAGE} bytes")
    if b"\n" not in message.strip():
        raise invalid(("body",), ValueError("the body must be a whole message: header "
                                            "fields, a blank line, the body"))
    return LearnReport(kind=kind, learned=await gateway.quarantine.teach(
        message, kind, "the admin, uploading it (API)"))
