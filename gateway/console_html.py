"""The operator's console's HTML: one layout, small helpers, everything escaped.

No template engine and no JavaScript: pages are short, and every value that came from mail
(a sender, a header, a subject, a verdict, a body's preview) goes through `esc`. The style
sheet makes tables scroll sideways and forms stack on a phone's width.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable

STYLE = """
:root { color-scheme: light dark; --line: #8884; --ok: #2a7d2a; --bad: #b3261e; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; }
header { display: flex; flex-wrap: wrap; gap: .3rem 1rem; align-items: center;
  padding: .6rem 1rem; border-bottom: 1px solid var(--line); }
header strong { margin-right: auto; }
header a, header button { font: inherit; }
nav { display: flex; flex-wrap: wrap; gap: .2rem .9rem; }
main { padding: 1rem; max-width: 80rem; }
main p, .detail { overflow-wrap: anywhere; }
h1 { font-size: 1.3rem; margin: 0 0 .8rem; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
form.search, form.inline { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end;
  margin-bottom: 1rem; }
label { display: flex; flex-direction: column; font-size: .85rem; gap: .15rem; }
input, select, button { font: inherit; padding: .35rem .5rem; min-height: 2.2rem; }
input { min-width: 12rem; max-width: 100%; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th { white-space: nowrap; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
td.detail { min-width: 16rem; word-break: break-word; }
.outcome { font-weight: 600; white-space: nowrap; }
.delivered, .passed, .accepted, .ok { color: var(--ok); }
.refused, .bounced, .expired, .failing, .dropped { color: var(--bad); }
.actions { display: flex; flex-wrap: wrap; gap: .5rem; margin: .8rem 0; }
.actions form.inline { margin: 0; }
.message { border: 1px solid var(--line); border-radius: .4rem; padding: .6rem .8rem;
  margin-bottom: 1rem; }
pre.preview { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 32rem;
  overflow: auto; margin: 0 0 1rem; padding: .6rem .8rem; border: 1px solid var(--line);
  border-radius: .4rem; font-size: .9rem; }
.flash { padding: .5rem .8rem; border: 1px solid var(--line); border-radius: .4rem; }
.muted { opacity: .7; font-size: .85rem; }
@media (max-width: 40rem) { input { min-width: 0; width: 100%; } label { width: 100%; } }
"""

NAV = (("tracking", "Tracking"), ("quarantine", "Quarantine"), ("greylist", "Greylist"),
       ("outbound", "Outbound"), ("dkim", "DKIM"), ("senders", "Senders"), ("health", "Health"))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def when(moment: float | None) -> str:
    if not moment:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(csrf)}">'


def button_form(action: str, label: str, csrf: str, fields: dict[str, str] | None = None
                ) -> str:
    """A POST form with one button (an action needs POST and the CSRF token)."""
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
                     for k, v in (fields or {}).items())
    return (f'<form class="inline" method="post" action="{esc(action)}">{csrf_field(csrf)}'
            f'{hidden}<button type="submit">{esc(label)}</button></form>')


def page_button(action: str, label: str) -> str:
    """A button that opens a page (GET: it changes nothing, so it carries no CSRF token),
    such as the step that asks to confirm an action."""
    return (f'<form class="inline" method="get" action="{esc(action)}">'
            f'<button type="submit">{esc(label)}</button></form>')


def table(headings: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> str:
    """Cells are HTML already (escape what they show). No headings: no header row."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    if not body:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<div class="wrap"><table>{thead}<tbody>{body}</tbody></table></div>'


def page(title: str, body: str, current: str = "", csrf: str = "", flash: str = "") -> str:
    """The layout: the navigation (when signed in), an optional notice, the body."""
    header = "<header><strong>SecuMail</strong>"
    if csrf:
        links = "".join(
            f'<a href="/console/{name}"{" aria-current=page" if name == current else ""}>'
            f"{esc(label)}</a>" for name, label in NAV)
        header += f"<nav>{links}</nav>" + button_form("/console/logout", "Sign out", csrf)
    header += "</header>"
    notice = f'<p class="flash" role="status">{esc(flash)}</p>' if flash else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)} - SecuMail</title><link rel=stylesheet '
            f'href="/console/style.css"></head><body>{header}<main><h1>{esc(title)}</h1>'
            f"{notice}{body}</main></body></html>")


def login_form(error: str = "") -> str:
    message = f'<p class="flash refused" role="alert">{esc(error)}</p>' if error else ""
    return page("Sign in", message + (
        '<form class="search" method="post" action="/console/login">'
        '<label>Admin token (SECUMAIL_ADMIN_TOKEN)<input type="password" name="token" '
        'autocomplete="current-password" required autofocus></label>'
        '<button type="submit">Sign in</button></form>'))
