"""The operator's console: message tracking, the quarantine, the greylist and each hop's
health, as server-rendered pages over the admin API's own route functions (the same code
answers a script and a person).

Sign-in with the admin token sets a session cookie (HttpOnly, SameSite=Strict, Secure);
every action is a POST form carrying the session's CSRF token. Without a session a page
answers 401 with the sign-in form, and an action 403, having done nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from gateway.auth import ConsoleSessions, client_of, too_many_wrong_tokens
from gateway.console_html import (
    STYLE,
    button_form,
    csrf_field,
    esc,
    login_form,
    page,
    page_button,
    table,
    when,
)
from gateway.context import Gateway, GatewayDep, get_outbound, get_store
from gateway.models import QuarantineDetail, QuarantinePreview, ReleaseReport, WhitelistRequest
from gateway.routers import dkim, dmarc, greylist, health, outbound, quarantine, tracking
from secumail.greylist_store import WhitelistKind
from secumail.logs import log_event

log = logging.getLogger("secumail.gateway.console")

router = APIRouter(prefix="/console", include_in_schema=False)
MAX_FORM = 16_384
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store", "X-Frame-Options": "DENY",
}
SEARCH_FIELDS = (("sender", "Sender"), ("recipient", "Recipient"), ("client", "Client IP"),
                 ("message_id", "Message-ID"), ("queue_id", "Queue id"))


def sessions(gateway: Gateway) -> ConsoleSessions:
    return ConsoleSessions(gateway.settings.admin_token, gateway.settings.console_secure_cookie)


def html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**HEADERS, **(headers or {})})


def signed_in(request: Request, gateway: Gateway) -> str | None:
    """The session's CSRF token when the request carries a valid session, else None."""
    cookie = request.cookies.get(ConsoleSessions.COOKIE)
    keeper = sessions(gateway)
    return keeper.csrf(cookie) if cookie and keeper.valid(cookie, time.time()) else None


async def form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(413, "form too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def refusal(request: Request, gateway: Gateway, fields: dict[str, str]) -> HTMLResponse | None:
    """403 for a POST without a valid session and its CSRF token; None when it may go on."""
    cookie = request.cookies.get(ConsoleSessions.COOKIE, "")
    keeper = sessions(gateway)
    if keeper.valid(cookie, time.time()) and keeper.csrf_matches(cookie, fields.get("csrf", "")):
        return None
    log_event(log, "console action refused", logging.WARNING, path=request.url.path,
              reason="no session or wrong CSRF token",
              client=client_of(request))
    return html(page("Refused", "<p>This form is no longer valid: "
                     '<a href="/console/login">sign in</a> again.</p>'), 403)


Page = Callable[[Request, Gateway, str], Awaitable[HTMLResponse]]
Action = Callable[[Request, Gateway, dict[str, str]], Awaitable[str]]


def console_page(path: str) -> Callable[[Page], Page]:
    """A GET page: the sign-in form (401) without a session."""
    def register(view: Page) -> Page:
        async def endpoint(request: Request, gateway: GatewayDep) -> HTMLResponse:
            csrf = signed_in(request, gateway)
            if csrf is None:
                return html(login_form(), 401)
            return await view(request, gateway, csrf)
        router.add_api_route(path, endpoint, methods=["GET"], response_class=HTMLResponse)
        return view
    return register


def console_action(path: str, back: str) -> Callable[[Action], Action]:
    """A POST action: 403 without a session or with a wrong CSRF token; after it, back to
    `back` (which may name the path's parameters: "/console/quarantine/{ident}") with its
    notice."""
    def register(action: Action) -> Action:
        async def endpoint(request: Request, gateway: GatewayDep) -> Response:
            fields = await form(request)
            if (refused := refusal(request, gateway, fields)) is not None:
                return refused
            try:
                notice = await action(request, gateway, fields)
            except HTTPException as error:
                notice = f"{error.status_code}: {error.detail}"
            except (RequestValidationError, ValidationError) as error:
                notice = "; ".join(str(e.get("msg", "")) for e in error.errors())
            where = back.format_map({k: quote(str(v), safe="")
                                     for k, v in request.path_params.items()})
            return RedirectResponse(f"{where}?{urlencode({'notice': notice})}", 303,
                                    headers=HEADERS)
        router.add_api_route(path, endpoint, methods=["POST"])
        return action
    return register


# --- sign-in ------------------------------------------------------------------------------


@router.get("/style.css")
async def style() -> Response:
    return Response(STYLE, media_type="text/css", headers={"Cache-Control": "max-age=3600"})


@router.get("")
async def home() -> Response:
    return RedirectResponse("/console/tracking", 303)


@router.get("/login", response_class=HTMLResponse)
async def login_page() -> HTMLResponse:
    return html(login_form())


@router.post("/login")
async def login(request: Request, gateway: GatewayDep) -> Response:
    fields = await form(request)
    keeper = sessions(gateway)
    client, now = client_of(request), time.monotonic()
    if wait := gateway.wrong_tokens.wait(client, now):
        return html(login_form(f"Too many wrong tokens: try again in {wait:.0f} s."), 429,
                    too_many_wrong_tokens(client, wait, request.url.path))
    if not keeper.token_matches(fields.get("token", "")):
        gateway.wrong_tokens.failed(client, now)
        log_event(log, "console sign-in failed", logging.WARNING, client=client)
        return html(login_form("Wrong token."), 401)
    log_event(log, "console sign-in", client=client)
    response = RedirectResponse("/console/tracking", 303, headers=HEADERS)
    response.set_cookie(ConsoleSessions.COOKIE, keeper.new_session(time.time()),
                        max_age=ConsoleSessions.LIFETIME, path="/console", httponly=True,
                        samesite="strict", secure=keeper.secure_cookie)
    return response


@router.post("/logout")
async def logout(request: Request, gateway: GatewayDep) -> Response:
    if (refused := refusal(request, gateway, await form(request))) is not None:
        return refused
    response = RedirectResponse("/console/login", 303, headers=HEADERS)
    response.delete_cookie(ConsoleSessions.COOKIE, path="/console", httponly=True,
                           samesite="strict", secure=sessions(gateway).secure_cookie)
    return response


def notice_of(request: Request) -> str:
    return request.query_params.get("notice", "")[:500]


# --- tracking -----------------------------------------------------------------------------


def message_html(message: dict[str, Any]) -> str:
    rows = [(esc(when(e["time"])), esc(e["service"]),
             f'<span class="outcome {esc(e["outcome"])}">{esc(e["outcome"])}</span>',
             f'<span class="detail">{esc(e["detail"])}</span>', esc(e["replica"]),
             esc(" ".join(q for q in (e["queue_id"], e["next_queue_id"]) if q)))
            for e in message["events"]]
    recipients = ", ".join(message["recipients"]) or "?"
    return (f'<section class="message"><p><span class="outcome {esc(message["outcome"])}">'
            f'{esc(message["outcome"].upper())}</span> &lt;{esc(message["sender"])}&gt; '
            f"&rarr; {esc(recipients)} <span class=muted>client {esc(message['client'] or '?')}"
            f" &middot; {esc(when(message['first']))}"
            + (f" &middot; &lt;{esc(message['message_id'])}&gt;" if message["message_id"] else "")
            + "</span></p>"
            + table(("Time", "Service", "Outcome", "Why", "Replica", "Queue ids"), rows, "")
            + "</section>")


@console_page("/tracking")
async def tracking_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    asked = {name: request.query_params.get(name, "")[:512] for name, _ in SEARCH_FIELDS}
    fields = "".join(f'<label>{esc(label)}<input name="{name}" value="{esc(asked[name])}">'
                     "</label>" for name, label in SEARCH_FIELDS)
    body = (f'<form class="search" method="get" action="/console/tracking">{fields}'
            '<button type="submit">Search</button></form>')
    if any(asked.values()):
        try:
            found = await tracking.search(gateway, **asked, since=0.0, until=0.0, limit=50)
        except HTTPException as error:
            body += f'<p class="flash">{esc(error.detail)}</p>'
        else:
            messages = found["messages"]
            body += f'<h2>{len(messages)} message{"s" if len(messages) != 1 else ""}</h2>'
            if found["truncated"]:
                body += (f'<p class="flash" role="status">Not every message: the search was '
                         f'cut short ({esc(found["cut"])}). Add a criterion to see the rest.</p>')
            body += "".join(message_html(m) for m in messages) or \
                '<p class="muted">No message matches.</p>'
    else:
        body += '<p class="muted">Search by any of these: every message one of whose ' \
                "events matches, with its path hop by hop.</p>"
    return html(page("Where did my mail go?", body, "tracking", csrf, notice_of(request)))


# --- quarantine ---------------------------------------------------------------------------


@console_page("/quarantine")
async def quarantine_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    items = await quarantine.list_quarantine(gateway, filter=None, limit=200)
    rows = [(esc(when(i.time)), esc(i.filter), f'<span class="outcome">{esc(i.verdict)}</span>',
             f"<span class=detail>{esc(i.reason)}</span>", esc(i.mail_from or "<>"),
             esc(", ".join(i.rcpt_tos)), subject_html(i.subject),
             f'<a href="/console/quarantine/{quote(i.id)}">Open</a>') for i in items]
    body = table(("Kept", "Filter", "Verdict", "Why", "Sender", "Recipients", "Subject", ""),
                 rows, "The quarantine is empty.")
    return html(page("Quarantine", body, "quarantine", csrf, notice_of(request)))


def subject_html(subject: str) -> str:
    """A message's decoded Subject as text (escaped), or a muted "(no subject)"."""
    if not subject:
        return '<span class="muted">(no subject)</span>'
    return f'<span class="detail">{esc(subject)}</span>'


def preview_html(shown: QuarantinePreview) -> str:
    """The body's preview: plain text in a <pre>, escaped; never rendered, nothing linked."""
    made = {"text/plain": "its first text/plain part",
            "text/html": "its HTML (tags, scripts and styles removed)"}.get(shown.source)
    if made is None:
        about = f"No text to show: {shown.note}."
    else:
        about = (f"The message's text, from {made}, as plain text"
                 + (" (the first 4,096 characters)" if shown.truncated else "")
                 + (f"; {shown.note}" if shown.note else "") + ".")
    text = f'<pre class="preview">{esc(shown.text)}</pre>' if shown.text else \
        ('<p class="muted">(The text is empty.)</p>' if made else "")
    return f'<h2>Preview</h2><p class="muted">{esc(about)}</p>{text}'


def quarantine_facts(detail: QuarantineDetail) -> str:
    return table((), [
        ("Subject", subject_html(detail.subject)),
        ("Kept by", esc(f"the {detail.filter} filter, {when(detail.time)}")),
        ("Verdict", esc(f"{detail.verdict}: {detail.reason}")),
        ("Sender", esc(detail.mail_from or "<>")), ("Recipients", esc(", ".join(detail.rcpt_tos))),
        ("Client", esc(detail.client.get("ADDR", "?"))), ("Size", esc(f"{detail.size} bytes")),
    ], "")


async def kept_message(ident: str, gateway: Gateway, csrf: str
                       ) -> QuarantineDetail | HTMLResponse:
    """The quarantined message's details, or the page saying there is none (404)."""
    try:
        return await quarantine.show_quarantine(ident, gateway)
    except HTTPException:
        return html(page("Quarantine", '<p class="flash">No such quarantined message.</p>',
                         "quarantine", csrf), 404)


@console_page("/quarantine/{ident}")
async def quarantine_item_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    ident = request.path_params["ident"]
    detail = await kept_message(ident, gateway, csrf)
    if isinstance(detail, HTMLResponse):
        return detail
    headers = table(("Header", "Value"), [(esc(n), f"<span class=detail>{esc(v)}</span>")
                                          for n, v in detail.headers], "No header.")
    path = f"/console/quarantine/{quote(ident, safe='')}"
    actions = ('<div class="actions">'
               + button_form(f"{path}/release", "Release", csrf)
               + button_form(f"{path}/release", "Release without learning", csrf,
                             {"learn": "false"})
               + button_form(f"{path}/learn", "Learn as spam, keep it", csrf, {"kind": "spam"})
               + button_form(f"{path}/learn", "Learn as ham, keep it", csrf, {"kind": "ham"})
               + page_button(f"{path}/delete", "Delete")
               + "</div><p class=muted>Release delivers it and teaches SpamAssassin's Bayes "
               "it is ham; learning keeps it here. Each is an event in tracking.</p>")
    return html(page(f"Quarantined message {ident}", quarantine_facts(detail) + actions
                     + preview_html(detail.preview) + "<h2>Headers</h2>" + headers,
                     "quarantine", csrf, notice_of(request)))


@console_action("/quarantine/{ident}/release", "/console/quarantine")
async def release(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    ident = request.path_params["ident"]
    answer = await quarantine.release(gateway, ident, fields.get("learn") != "false",
                                      "console")
    if isinstance(answer, ReleaseReport):
        return f"Released {ident} to {answer.next_hop}: {answer.reply}; {answer.learned}"
    return f"Not released: the next hop refused it ({bytes(answer.body).decode()[:300]})"


@console_action("/quarantine/{ident}/learn", "/console/quarantine/{ident}")
async def learn(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    ident, kind = request.path_params["ident"], fields.get("kind")
    if kind not in ("spam", "ham"):
        return "Choose spam or ham."
    report = await quarantine.learn(gateway, ident, "spam" if kind == "spam" else "ham",
                                    "console")
    return f"Taught {ident} as {report.kind}, kept: {report.learned}"


@console_page("/quarantine/{ident}/delete")
async def delete_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    """The step that asks to confirm a deletion (no JavaScript: a page, then a POST)."""
    ident = request.path_params["ident"]
    detail = await kept_message(ident, gateway, csrf)
    if isinstance(detail, HTMLResponse):
        return detail
    path = f"/console/quarantine/{quote(ident, safe='')}"
    body = ("<p>Delete this message for good? It can then be neither released nor learned."
            "</p>" + quarantine_facts(detail) + '<div class="actions">'
            + button_form(f"{path}/delete", "Delete for good", csrf, {"confirm": "yes"})
            + f'<a href="{esc(path)}">Cancel</a></div>')
    return html(page(f"Delete quarantined message {ident}?", body, "quarantine", csrf))


@console_action("/quarantine/{ident}/delete", "/console/quarantine")
async def delete(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    ident = request.path_params["ident"]
    if fields.get("confirm") != "yes":
        return f"Not deleted: {ident} is deleted once confirmed (its page's Delete)."
    await quarantine.delete_quarantine(ident, gateway)
    return f"Deleted {ident}."


# --- greylist -----------------------------------------------------------------------------


@console_page("/greylist")
async def greylist_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    match = request.query_params.get("match", "")[:320]
    try:
        store = await get_store(gateway)
        entries = await greylist.list_entries(gateway, store, limit=200,
                                              match=match.lower())
        listed = await greylist.get_whitelist(gateway, store)
    except HTTPException as error:
        return html(page("Greylist", f'<p class="flash">{esc(error.detail)}</p>', "greylist",
                         csrf), 503)
    rows = [(esc(e.network), esc(e.sender or "<>"), esc(e.recipient), esc(when(e.first_seen)),
             esc(when(e.last_seen)), esc(e.state)) for e in entries]
    white = [(esc(w.kind), esc(w.value), esc(w.source),
              button_form("/console/greylist/whitelist/remove", "Remove", csrf,
                          {"kind": w.kind, "value": w.value}) if w.source == "admin" else "")
             for w in listed.entries]
    body = (f'<form class="search" method="get" action="/console/greylist"><label>Entries '
            f'containing<input name="match" value="{esc(match)}"></label>'
            '<button type="submit">Filter</button></form>'
            + table(("Network", "Sender", "Recipient", "First seen", "Last seen", "State"),
                    rows, "No greylist entry.")
            + "<h2>Whitelist</h2>"
            + f'<form class="inline" method="post" action="/console/greylist/whitelist">'
            f'{csrf_field(csrf)}<label>Kind<select name="kind"><option value="client">'
            'client (IP or network)</option><option value="recipient">recipient</option>'
            '</select></label><label>Value<input name="value" required></label>'
            '<button type="submit">Add</button></form>'
            + table(("Kind", "Value", "From", ""), white, "Nothing whitelisted."))
    return html(page("Greylist", body, "greylist", csrf, notice_of(request)))


def kind_of(fields: dict[str, str]) -> WhitelistKind | None:
    kind = fields.get("kind")
    return "client" if kind == "client" else "recipient" if kind == "recipient" else None


@console_action("/greylist/whitelist", "/console/greylist")
async def whitelist_add(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    kind = kind_of(fields)
    if kind is None:
        return "Choose client or recipient."
    store = await get_store(gateway)
    item = await greylist.add_whitelist(
        WhitelistRequest(kind=kind, value=fields.get("value", "")[:320]), store)
    value = getattr(item, "value", fields.get("value", ""))
    return f"Whitelisted {kind} {value}."


@console_action("/greylist/whitelist/remove", "/console/greylist")
async def whitelist_remove(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    kind, value = kind_of(fields), fields.get("value", "")
    if kind is None:
        return "Choose client or recipient."
    store = await get_store(gateway)
    await greylist.delete_whitelist(kind, value, store)
    return f"Removed {kind} {value} from the whitelist."


# --- outbound -----------------------------------------------------------------------------


@console_page("/outbound")
async def outbound_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    try:
        held = await outbound.list_held(await get_outbound(gateway))
    except HTTPException as error:
        return html(page("Outbound", f'<p class="flash">{esc(error.detail)}</p>', "outbound",
                         csrf), 503)
    rows = [(esc(h.subject), esc(when(h.since)), f"<span class=detail>{esc(h.reason)}</span>",
             "yes" if h.notified else "not yet",
             button_form("/console/outbound/release", "Release", csrf, {"subject": h.subject}))
            for h in held]
    limits = ", ".join(limit.text for limit in gateway.settings.outbound) or "none"
    body = ("<p>Senders, clients and users that tried to send far over their outbound limits"
            " (SECUMAIL_OUTBOUND_HOLD_FACTOR times one): all their mail is answered 450 until"
            " released. Their MTAs keep it; a host or an account sending that much is often "
            f'compromised. <span class="muted">Limits: {esc(limits)}</span></p>'
            + table(("Held", "Since", "Why", "Admin told", ""), rows, "Nothing is held."))
    return html(page("Outbound", body, "outbound", csrf, notice_of(request)))


@console_action("/outbound/release", "/console/outbound")
async def outbound_release(request: Request, gateway: Gateway, fields: dict[str, str]) -> str:
    subject = fields.get("subject", "")[:400]
    if not await outbound.release(await get_outbound(gateway), subject, "console"):
        return f"Nothing held as {subject}."
    return f"Released {subject}: its mail goes out again, within its limits."


# --- DKIM keys ------------------------------------------------------------------------------


@console_page("/dkim")
async def dkim_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    try:
        keys = await asyncio.to_thread(dkim.listed_keys, gateway.settings)
    except OSError as error:
        return html(page("DKIM keys", f'<p class="flash">{esc(error)}</p>', "dkim", csrf), 503)
    rows = [(esc(k.domain), esc(k.selector), esc(k.key_type or ""),
             f'<span class="outcome {"ok" if k.role == "signing" else ""}">'
             f"{esc(k.role or ('signing' if k.active else 'inactive'))}</span>",
             f'<span class="detail">{esc(k.record_name)}</span>',
             f'<span class="detail"><code>{esc(k.record_value)}</code></span>',
             esc(when(k.removable_after)) if k.removable_after else "",
             esc(k.error or ""))
            for k in keys]
    waiting = [k for k in keys if k.role == "awaiting-record"]
    notice = (f'<p class="flash" role="status">Publish {len(waiting)} record(s): a rotated '
              "key signs once its TXT record is in DNS.</p>" if waiting else "")
    body = (notice + "<p>Each key's TXT record, as DNS must publish it. A retired key's "
            "record stays until its date (mail it signed is still being checked). Keys are "
            "made with <code>secumail-dkim keygen</code> or <code>POST /admin/dkim/keys"
            "</code>; SECUMAIL_DKIM_ROTATE_DAYS rotates them.</p>"
            + table(("Domain", "Selector", "Type", "Role", "Record name", "Record value",
                     "Record removable after", "Error"), rows, "No DKIM key yet."))
    return html(page("DKIM keys", body, "dkim", csrf, notice_of(request)))


# --- reports about our domains ---------------------------------------------------------------


@console_page("/senders")
async def senders_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    try:
        days = min(90, max(1, int(request.query_params.get("days", "7"))))
    except ValueError:
        days = 7
    try:
        found = await dmarc.received_reports(gateway, days)
    except HTTPException as error:
        return html(page("Who sends as my domain", f'<p class="flash">{esc(error.detail)}</p>',
                         "senders", csrf), error.status_code)
    rows = [(esc(s.domain), esc(s.source_ip), esc(s.reporter), esc(s.messages),
             esc(f"{s.dkim_pass} ({s.dkim_pass * 100 // max(1, s.messages)}%)"),
             esc(f"{s.spf_pass} ({s.spf_pass * 100 // max(1, s.messages)}%)"),
             esc(", ".join(f"{k} {v}" for k, v in sorted(s.dispositions.items()))))
            for s in found.senders]
    tls = [(esc(t.policy_domain), esc(t.policy_type), esc(t.reporter), esc(t.successes),
            f'<span class="{"failing" if t.failures else ""}">{esc(t.failures)}</span>')
           for t in found.tls]
    body = (f'<form class="search" method="get" action="/console/senders"><label>Days'
            f'<input name="days" type="number" min="1" max="90" value="{days}"></label>'
            '<button type="submit">Show</button></form>'
            "<p>What other receivers reported (DMARC aggregate reports sent to "
            f"SECUMAIL_DMARC_RUA_ADDRESS) about mail in your domains' name. An address that "
            "is not yours with no aligned DKIM or SPF pass sends as you without right.</p>"
            + table(("Domain", "Source", "Reporter", "Messages", "Aligned DKIM",
                     "Aligned SPF", "Receiver did"), rows, "No DMARC report received.")
            + "<h2>TLS to your domains (TLS-RPT)</h2>"
            + table(("Policy domain", "Policy", "Reporter", "Sessions", "Failures"), tls,
                    "No TLS report received."))
    return html(page("Who sends as my domain", body, "senders", csrf, notice_of(request)))


# --- health -------------------------------------------------------------------------------


@console_page("/health")
async def health_page(request: Request, gateway: Gateway, csrf: str) -> HTMLResponse:
    report = await health.health(gateway)
    rows = []
    for service in report.services:
        for replica in service.replicas or []:
            rows.append((esc(service.service), esc(replica.name or replica.instance),
                         f'<span class="outcome {esc(replica.status)}">{esc(replica.status)}'
                         "</span>", esc(f"{(replica.latency_seconds or 0) * 1000:.1f} ms"),
                         f"<span class=detail>{esc(replica.last_error or '')}</span>"))
        if not service.replicas:
            rows.append((esc(service.service), "", '<span class="outcome failing">failing'
                         "</span>", "", f"<span class=detail>{esc(service.error or '')}</span>"))
    probe = report.probe
    canary = (f"<p>Last canary: {'came through' if probe.ok else 'failed'}"
              f" <span class=muted>{esc(probe.error or '')}</span></p>") if probe else ""
    body = (f'<p>The chain is <span class="outcome {esc(report.status)}">{esc(report.status)}'
            f"</span> <span class=muted>checked {esc(when(report.checked_at))}</span></p>"
            + canary + table(("Service", "Replica", "Status", "Probe", "Last error"), rows,
                             "No hop."))
    return html(page("Health", body, "health", csrf))

