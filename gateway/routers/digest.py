"""The quarantine digest's links (public: a user has no token) and the admin's "send now".

A link's page shows the message it stands for and one button; the button's POST acts. A
client is refused (429) past LINK_REQUESTS requests a minute (gateway/digest.py), and,
like a token guesser, past SECUMAIL_GATEWAY_WRONG_TOKENS links that are not ours.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from gateway.auth import client_of, too_many_wrong_tokens
from gateway.console_html import esc, page
from gateway.context import Gateway, GatewayDep, problem
from gateway.digest import LINK_PATH, USERS_RELEASE, BadLink, Link, one_line
from gateway.models import DigestReport
from gateway.preview import subject
from gateway.quarantine import ReleaseRefused
from gateway.routers.console import form, html
from secumail.logs import log_event

log = logging.getLogger("secumail.gateway")

links = APIRouter(include_in_schema=False)
admin = APIRouter(prefix="/admin/quarantine", tags=["quarantine"])
TOKEN_CHARS = 512  # a link's token is about 120: anything longer is not one
VERBS = {"release": "Release it to me", "delete": "Delete it"}


def refused(status: int, title: str, text: str, headers: dict[str, str] | None = None
            ) -> HTMLResponse:
    return html(page(title, f"<p>{esc(text)}</p>"), status, headers)


def checked(request: Request, gateway: Gateway, token: str) -> Link | HTMLResponse:
    """The link a request carries, or the page that refuses it (and counts a bad one)."""
    digest = gateway.digest
    if digest is None:
        return refused(404, "Not found", "Quarantine digests are off here.")
    client, now = client_of(request), time.monotonic()
    wait = max(digest.requests.wait(client, now), gateway.wrong_tokens.wait(client, now))
    if wait:
        return refused(429, "Too many requests", f"Try again in {wait:.0f} seconds.",
                       too_many_wrong_tokens(client, wait, LINK_PATH))
    digest.requests.failed(client, now)  # every request counts against the rate
    try:
        return digest.links.read(token[:TOKEN_CHARS], time.time())
    except (BadLink, UnicodeDecodeError, ValueError) as error:
        expired = isinstance(error, BadLink) and error.expired
        if not expired:
            gateway.wrong_tokens.failed(client, now)
        log_event(log, "digest link refused", logging.WARNING, client=client,
                  reason=str(error)[:100])
        if expired:
            return refused(410, "Link expired", "This link has expired: ask your "
                           "administrator for the message, or wait for your next digest.")
        return refused(403, "Not a valid link", "This link is not valid.")


async def kept_for_recipient(gateway: Gateway, link: Link) -> tuple[str, str] | None:
    """(sender, subject) of the message when it is still kept for the link's recipient."""
    store = gateway.quarantine.quarantine
    record = await asyncio.to_thread(store.record, link.ident)
    if record is None or record.filter not in USERS_RELEASE or \
            link.recipient.lower() not in {r.lower() for r in record.rcpt_tos}:
        return None
    head = await asyncio.to_thread(store.head, record)
    return record.mail_from.strip("<>") or "(no sender)", subject(head)


GONE = ("Already done", "This message was already released or deleted for you (or the "
        "quarantine's time for it ran out).")


@links.get(LINK_PATH, response_class=HTMLResponse)
async def open_link(request: Request, gateway: GatewayDep,
                    t: str = Query("", max_length=TOKEN_CHARS)) -> HTMLResponse:
    link = checked(request, gateway, t)
    if isinstance(link, HTMLResponse):
        return link
    found = await kept_for_recipient(gateway, link)
    if found is None:
        return refused(410, *GONE)
    sender, title = found
    body = (f'<div class="message"><p>From: {esc(one_line(sender))}<br>'
            f"Subject: {esc(one_line(title) or '(none)')}<br>"
            f"Kept for: {esc(link.recipient)}</p></div>"
            f'<form class="inline" method="post" action="{LINK_PATH}">'
            f'<input type="hidden" name="t" value="{esc(t)}">'
            f'<button type="submit">{esc(VERBS[link.action])}</button></form>')
    return html(page("Your quarantined message", body))


@links.post(LINK_PATH, response_class=HTMLResponse)
async def use_link(request: Request, gateway: GatewayDep) -> HTMLResponse:
    link = checked(request, gateway, (await form(request)).get("t", ""))
    if isinstance(link, HTMLResponse):
        return link
    if await kept_for_recipient(gateway, link) is None:
        return refused(410, *GONE)
    # A user's release teaches Bayes nothing: one user's taste is not the site's ham.
    if link.action == "release":
        try:
            done = await gateway.quarantine.release(
                link.ident, learn=False, via="digest link",
                recipient=link.recipient) is not None
        except ReleaseRefused as error:
            log_event(log, "release refused", logging.WARNING, id=link.ident,
                      step=error.step, reply=error.reply[:200])
            return refused(503, "Not released yet", "The mail server could not take the "
                           "message just now: try the link again later.")
    else:
        done = await asyncio.to_thread(gateway.quarantine.quarantine.drop_recipient,
                                       link.ident, link.recipient)
    if not done:
        return refused(410, *GONE)
    log_event(log, f"quarantined message {link.action}d by its recipient", id=link.ident,
              recipient=link.recipient)
    text = ("Released: the message is on its way to your mailbox." if link.action == "release"
            else "Deleted: the message is gone for you.")
    return html(page("Done", f'<p class="flash" role="status">{esc(text)}</p>'))


@admin.post("/digest", response_model=DigestReport,
            summary="Send the users' quarantine digests now (as the daily round does)",
            responses={409: problem("Digests are off (SECUMAIL_QUARANTINE_DIGEST)")})
async def send_digests(gateway: GatewayDep) -> DigestReport:
    if gateway.digest is None:
        raise HTTPException(409, "quarantine digests are off (SECUMAIL_QUARANTINE_DIGEST)")
    done = await gateway.digest.run()
    return DigestReport(sent=done.sent, failed=done.failed)
