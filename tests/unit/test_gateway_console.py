"""The operator's console without a browser (FastAPI's test client): sign-in, the cookie's
flags, CSRF, what a request without a session gets, and escaping of what mail wrote."""

from __future__ import annotations

import base64
import html
import quopri
import re
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import ConsoleSessions, WrongTokens
from secumail import dkim_keys
from tests.unit.test_gateway_api import (  # noqa: F401 (fixtures)
    ADMIN,
    KEPT_SPAM,
    Gateway,
    found,
    kept_spam,
    make_gateway,
    quarantined,
    state,
    tracked,
)

PAGES = ["/console/tracking", "/console/tracking?sender=a@remote.test", "/console/quarantine",
         "/console/quarantine/{id}", "/console/greylist", "/console/outbound",
         "/console/dkim", "/console/senders", "/console/health"]
ACTIONS = [("/console/quarantine/{id}/release", {}),
           ("/console/quarantine/{id}/release", {"learn": "false"}),
           ("/console/quarantine/{id}/learn", {"kind": "spam"}),
           ("/console/quarantine/{id}/delete", {"confirm": "yes"}),
           ("/console/greylist/whitelist", {"kind": "client", "value": "192.0.2.9"}),
           ("/console/greylist/whitelist/remove", {"kind": "recipient", "value": "abuse@"}),
           ("/console/outbound/release", {"subject": "sender:spam@secumail.test"}),
           ("/console/logout", {})]


@pytest.fixture
def console(make_gateway: Any) -> Gateway:  # noqa: F811
    gateway: Gateway = make_gateway(console_secure_cookie=False)  # the test client: http
    return gateway


def sign_in(gateway: Gateway) -> str:
    """Signs the test client in; the CSRF token its forms carry."""
    response = gateway.client.client.post("/console/login", data={"token": ADMIN},
                                          follow_redirects=False)
    assert response.status_code == 303, response.text
    page = gateway.client.client.get("/console/quarantine")
    assert page.status_code == 200
    return re.findall(r'name="csrf" value="([0-9a-f]{64})"', page.text)[0]


def test_the_cookie_is_httponly_samesite_and_secure(make_gateway: Any) -> None:  # noqa: F811
    gateway = make_gateway()
    response = gateway.client.client.post("/console/login", data={"token": ADMIN},
                                          follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    for flag in ("httponly", "samesite=strict", "secure", "path=/console", "max-age=28800"):
        assert flag in cookie, cookie
    assert ADMIN.lower() not in cookie  # the token itself never leaves in a cookie


def test_a_wrong_token_signs_nobody_in(console: Gateway) -> None:
    response = console.client.client.post("/console/login", data={"token": ADMIN[:-1] + "x"})
    assert response.status_code == 401 and "Wrong token" in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_show_only_the_sign_in_form(console: Gateway, path: str
                                                            ) -> None:
    ident = quarantined(console.settings)
    for cookie in ("", "9999999999.forged", f"{10**10}." + "0" * 64):
        console.client.client.cookies.clear()
        if cookie:
            console.client.client.cookies.set(ConsoleSessions.COOKIE, cookie, path="/console")
        response = console.client.client.get(path.replace("{id}", ident))
        assert response.status_code == 401, (path, cookie)
        assert 'action="/console/login"' in response.text and ident not in response.text


@pytest.mark.parametrize(("path", "fields"), ACTIONS)
@pytest.mark.parametrize("credentials", ["none", "session without csrf", "csrf of another"])
def test_actions_without_a_session_and_its_csrf_token_change_nothing(
        console: Gateway, path: str, fields: dict[str, str], credentials: str) -> None:
    ident = quarantined(console.settings)
    console.store.db.execute("INSERT INTO whitelist VALUES ('recipient', 'abuse@', 1)")
    before = state(console)
    data = dict(fields)
    if credentials != "none":
        sign_in(console)
        if credentials == "csrf of another":
            data["csrf"] = ConsoleSessions(console.settings.admin_token, False).csrf("1.x")
    response = console.client.client.post(path.replace("{id}", ident), data=data,
                                          follow_redirects=False)
    assert response.status_code == 403, (path, credentials, response.text)
    assert state(console) == before


def test_signed_in_an_admin_releases_deletes_and_whitelists(console: Gateway) -> None:
    csrf = sign_in(console)
    client = console.client.client
    kept, other = quarantined(console.settings), quarantined(console.settings, "spamd")
    page = client.get(f"/console/quarantine/{kept}")
    assert "virus Eicar-Test-Signature" in page.text and "Subject" in page.text
    response = client.post(f"/console/quarantine/{kept}/release", data={"csrf": csrf})
    assert response.status_code == 200 and "Released" in response.text  # after the redirect
    assert len(console.world.released) == 1
    client.post(f"/console/quarantine/{other}/delete", data={"csrf": csrf, "confirm": "yes"})
    assert kept not in client.get("/console/quarantine").text
    assert other not in client.get("/console/quarantine").text
    client.post("/console/greylist/whitelist", data={"csrf": csrf, "kind": "client",
                                                       "value": "192.0.2.0/24"})
    assert console.store.db.execute("SELECT value FROM whitelist").fetchall() == [
        ("192.0.2.0/24",)]
    assert "192.0.2.0/24" in client.get("/console/greylist").text
    client.post("/console/greylist/whitelist/remove", data={"csrf": csrf, "kind": "client",
                                                              "value": "192.0.2.0/24"})
    assert console.store.db.execute("SELECT value FROM whitelist").fetchall() == []
    assert "Health" in client.get("/console/health").text
    client.post("/console/logout", data={"csrf": csrf})
    assert client.get("/console/quarantine").status_code == 401


FORM = re.compile(r'<form class="inline" method="(get|post)" action="([^"]+)">(.*?)'
                  r'<button type="submit">([^<]+)</button></form>')
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


def buttons(text: str) -> dict[str, tuple[str, str, dict[str, str]]]:
    """A page's one-button forms: label -> method, action, the fields it sends."""
    return {html.unescape(label): (method, html.unescape(action),
                                   {k: html.unescape(v) for k, v in HIDDEN.findall(inner)})
            for method, action, inner, label in FORM.findall(text)}


def test_a_quarantined_messages_buttons_post_to_their_routes(console: Gateway) -> None:
    """Issue 29: beside Release, Release without learning and learning a kept message as
    spam or ham; Delete asks first (a page, then a POST: the console sends no JavaScript)."""
    csrf = sign_in(console)
    client = console.client.client
    ident = kept_spam(console.settings)
    path = f"/console/quarantine/{ident}"
    found_buttons = buttons(client.get(path).text)
    assert {label: (method, action, fields) for label, (method, action, fields)
            in found_buttons.items() if label != "Sign out"} == {
        "Release": ("post", f"{path}/release", {"csrf": csrf}),
        "Release without learning": ("post", f"{path}/release",
                                     {"csrf": csrf, "learn": "false"}),
        "Learn as spam, keep it": ("post", f"{path}/learn", {"csrf": csrf, "kind": "spam"}),
        "Learn as ham, keep it": ("post", f"{path}/learn", {"csrf": csrf, "kind": "ham"}),
        "Delete": ("get", f"{path}/delete", {}),
    }

    def press(label: str, buttons_of: dict[str, tuple[str, str, dict[str, str]]]) -> Any:
        method, action, fields = buttons_of[label]
        return client.request(method.upper(), action, data=fields or None)

    learned = press("Learn as spam, keep it", found_buttons)
    assert learned.url.path == path  # back to the message, which is kept
    assert f"Taught {ident} as spam, kept: learned as spam" in html.unescape(learned.text)
    assert console.world.learned == [(KEPT_SPAM, "spam")] and console.world.released == []

    confirm = press("Delete", found_buttons)
    assert confirm.status_code == 200 and "Delete this message for good?" in confirm.text
    assert ident in client.get("/console/quarantine").text  # asking deleted nothing
    refused = client.post(f"{path}/delete", data={"csrf": csrf})  # not confirmed
    assert "Not deleted" in refused.text and ident in client.get("/console/quarantine").text
    deleted = press("Delete for good", buttons(confirm.text))
    assert f"Deleted {ident}." in deleted.text
    assert ident not in client.get("/console/quarantine").text


def test_the_console_releases_without_learning_and_tracking_says_so(console: Gateway
                                                                    ) -> None:
    csrf = sign_in(console)
    tracked(console)
    quiet = kept_spam(console.settings)
    response = console.client.client.post(f"/console/quarantine/{quiet}/release",
                                          data={"csrf": csrf, "learn": "false"})
    assert "not learned: released without learning" in response.text
    assert console.world.learned == [] and len(console.world.released) == 1
    [message] = found(console, message_id="kept1@offers.test")
    [event] = message["events"]
    assert (event["service"], event["outcome"]) == ("gateway", "released")
    assert event["detail"].startswith(f"{quiet} by the admin (console) to postfix:10027: ")
    assert event["detail"].endswith("; released without learning")
    # The console's search shows it too.
    page = console.client.client.get("/console/tracking?message_id=kept1%40offers.test").text
    assert "released without learning" in page and "(console)" in page

    taught = kept_spam(console.settings, KEPT_SPAM.replace(b"<kept1@", b"<kept2@"),
                       IDENT="4Q2AB8")
    console.client.client.post(f"/console/quarantine/{taught}/release", data={"csrf": csrf})
    assert console.world.learned == [(KEPT_SPAM.replace(b"<kept1@", b"<kept2@"), "ham")]
    [message] = found(console, message_id="kept2@offers.test")
    assert message["events"][-1]["detail"] == (f"ham, taught by the admin, releasing {taught} "
                                               "(console): learned as ham")


def test_what_mail_wrote_is_shown_escaped(console: Gateway) -> None:
    sign_in(console)
    from secumail.quarantine import Quarantine
    from tests.unit.test_gateway_api import Envelope
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    ident = Quarantine(console.settings.quarantine_dir).store(
        "clamav", Envelope(mail_from=f"a{hostile}@remote.test"),
        f"Subject: {hostile}\r\n\r\nbody\r\n".encode(), "virus", hostile)
    for path in ("/console/quarantine", f"/console/quarantine/{ident}"):
        text = console.client.client.get(path).text
        assert "<script>" not in text and "<img" not in text, path
        assert "&lt;script&gt;" in text
    response = console.client.client.get("/console/quarantine")
    assert "default-src 'none'" in response.headers["content-security-policy"]


def test_tracking_off_says_so_on_the_page(console: Gateway) -> None:
    sign_in(console)
    text = console.client.client.get("/console/tracking?sender=a@remote.test").text
    assert "tracking is off" in text  # the test gateway runs without tracking


def test_wrong_tokens_are_counted_per_client_within_the_window() -> None:
    wrong = WrongTokens(limit=3, window=60)
    for now in (0, 10, 20):
        assert wrong.wait("192.0.2.9", now) == 0
        wrong.failed("192.0.2.9", now)
    assert wrong.wait("192.0.2.9", 30) == 30  # until the first failure is 60 s old
    assert wrong.wait("192.0.2.10", 30) == 0  # another client
    assert wrong.wait("192.0.2.9", 60) == 0  # two failures left in the window
    wrong.failed("192.0.2.9", 61)
    assert wrong.wait("192.0.2.9", 62) == 8


def test_the_wrong_tokens_of_many_addresses_take_bounded_memory() -> None:
    wrong = WrongTokens(limit=3, window=60)
    for n in range(WrongTokens.MAX_CLIENTS + 500):
        for _ in range(5):
            wrong.failed(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 1.0)
    assert len(wrong._failures) == WrongTokens.MAX_CLIENTS
    assert max(map(len, wrong._failures.values())) == 3


def test_a_console_guesser_is_refused_even_with_the_right_token(make_gateway: Any) -> None:  # noqa: F811
    gateway = make_gateway(console_secure_cookie=False, gateway_wrong_tokens=2)
    for _ in range(2):
        assert gateway.client.client.post("/console/login",
                                          data={"token": "x" * 20}).status_code == 401
    response = gateway.client.client.post("/console/login", data={"token": ADMIN})
    assert response.status_code == 429 and "Too many wrong tokens" in response.text
    assert "set-cookie" not in response.headers and int(response.headers["retry-after"]) > 0
    assert gateway.client.client.get("/admin/quarantine", headers={
        "Authorization": f"Bearer {ADMIN}"}).status_code == 429  # the API counts them too


# --- what a kept message is: its Subject and a preview of its text (issue 32) ------------------

PREVIEW = re.compile(r'<pre class="preview">(.*?)</pre>', re.S)


def keep(gateway: Gateway, message: bytes) -> str:
    from secumail.quarantine import Quarantine
    from tests.unit.test_gateway_api import Envelope
    return Quarantine(gateway.settings.quarantine_dir).store(
        "spamd", Envelope(), message, "spam", "score 9.1")


def row_of(text: str, ident: str) -> str:
    """The quarantine list's row of one message, as HTML."""
    [row] = [r for r in re.findall(r"<tr>(.*?)</tr>", text, re.S) if ident in r]
    return row


def shown_preview(gateway: Gateway, ident: str) -> str:
    """The text a quarantined message's page previews, unescaped; "" without a preview."""
    text = gateway.client.client.get(f"/console/quarantine/{ident}").text
    found = PREVIEW.findall(text)
    assert len(found) <= 1
    return html.unescape(found[0]) if found else ""


def test_the_quarantine_list_shows_each_subject_decoded_and_escaped(console: Gateway) -> None:
    sign_in(console)
    folded = keep(console, b"From: a@remote.test\r\nSubject: =?utf-8?b?SMOpbGxv?=\r\n"
                  b" =?ISO-8859-1?Q?_w=F6rld?=,\r\n\tfolded\r\n\r\nbody\r\n")
    script = keep(console, b"Subject: =?utf-8?q?=3Cscript=3Ealert(1)=3C/script=3E?= "
                  b"<script>alert(2)</script>\r\n\r\nbody\r\n")
    long = keep(console, b"Subject: " + b"spam " * 100 + b"\r\n\r\nbody\r\n")
    none = keep(console, b"From: a@remote.test\r\n\r\nSubject: in the body, not a header\r\n")
    text = console.client.client.get("/console/quarantine").text
    assert "<th>Subject</th>" in text
    assert "Héllo wörld, folded" in row_of(text, folded)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;script&gt;alert(2)&lt;/script&gt;" \
        in row_of(text, script)
    assert "<script>" not in text
    assert "(no subject)" in row_of(text, none) and "in the body" not in text
    shown = re.search(r'<span class="detail">(spam[^<]*)</span>', row_of(text, long))
    assert shown and len(shown.group(1)) == 120 and shown.group(1).endswith("\u2026")
    # The API's list says the same, as data.
    listed = {item["id"]: item["subject"] for item in console.client.get(
        "/admin/quarantine", headers={"Authorization": f"Bearer {ADMIN}"}).json()}
    assert listed[folded] == "Héllo wörld, folded" and listed[none] == ""
    assert listed[script] == "<script>alert(1)</script> <script>alert(2)</script>"
    # The page's own message view shows it too.
    page = console.client.client.get(f"/console/quarantine/{folded}").text
    assert "Héllo wörld, folded" in page


def test_listing_reads_only_the_header_block_of_the_listed_messages(
        console: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing reads no more than 64 KiB of each listed message, and none of the others."""
    from secumail.quarantine import Quarantine
    from tests.unit.test_gateway_api import Envelope
    for n in range(5):
        keep(console, f"Subject: number {n}\r\n\r\n".encode() + b"x" * 200_000)
    later = Quarantine(console.settings.quarantine_dir, clock=lambda: time.time() + 60)
    endless = later.store("spamd", Envelope(), b"Subject: endless\r\n"
                          + b"X-Junk: yyyyyyyyyyyy\r\n" * 20_000 + b"\r\nbody\r\n",
                          "spam", "score 9.1")  # 440 KB of header fields, the newest
    read: list[int] = []
    original = Quarantine.head

    def head(self: Quarantine, record: Any, limit: int = 65_536) -> bytes:
        data = original(self, record, limit)
        read.append(len(data))
        return data

    monkeypatch.setattr(Quarantine, "head", head)
    listed = console.client.get("/admin/quarantine?limit=3",
                                headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert len(listed) == 3 and len(read) == 3  # only the page asked for
    assert listed[0]["id"] == endless and listed[0]["subject"] == "endless"
    assert read[0] == 65_536  # its header block is longer: cut at 64 KiB
    assert read[1:] == [8192, 8192]  # the others: one chunk with their blank line, not their
    # 200 KB body


def test_a_multipart_messages_base64_text_is_previewed(console: Gateway) -> None:
    sign_in(console)
    text = "Grüße aus Köln,\nsee you <b>tomorrow</b> at http://meet.example/room\n"
    ident = keep(console, (
        b"Subject: meeting\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="==b"\r\n\r\n'
        b"preamble\r\n--==b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(text.encode()).replace(b"\n", b"\r\n")
        + b"\r\n--==b\r\nContent-Type: text/html\r\n\r\n<p>the HTML version</p>\r\n"
        b"--==b--\r\n"))
    page = console.client.client.get(f"/console/quarantine/{ident}").text
    assert "its first text/plain part" in page
    assert shown_preview(console, ident) == text.rstrip()
    assert "&lt;b&gt;tomorrow&lt;/b&gt;" in page and "<b>" not in page  # text, escaped
    assert 'href="http://meet' not in page  # no link made of a URL
    assert "the HTML version" not in page


def test_an_html_only_message_is_previewed_without_tags_or_script(console: Gateway) -> None:
    sign_in(console)
    markup = (
        "<!DOCTYPE html><html><head><title>Title bar</title><style>p { color: red }</style>"
        '<script src="http://tracker.example/t.js"></script></head><body>'
        '<p>Dear customer,<img src="http://tracker.example/pixel.png" onerror="alert(1)">'
        "</p><script>document.location='http://evil.example/'+document.cookie</script>"
        '<div>Your account is <b>locked</b>: <a href="http://evil.example/login">unlock it'
        "</a> &amp; smile &lt;3</div><!-- hidden comment --><SCRIPT/>alert(2)</SCRIPT >"
        "<table><tr><td>cell one</td><td>cell two</td></tr></table></body></html>")
    ident = keep(console, b"Subject: locked\r\nContent-Type: text/html; charset=iso-8859-1\r\n"
                 b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                 + quopri.encodestring(markup.encode("latin-1")).replace(b"\n", b"\r\n"))
    page = console.client.client.get(f"/console/quarantine/{ident}")
    preview = shown_preview(console, ident)
    assert preview == ("Dear customer,\n\nYour account is locked: unlock it & smile <3\n\n"
                       "cell one cell two")
    for hidden in ("<", "script", "alert", "cookie", "color", "Title bar", "tracker",
                   "evil.example", "hidden comment", "onerror"):
        assert hidden not in preview.replace("<3", ""), hidden
    assert "tags, scripts and styles removed" in page.text
    assert "<img" not in page.text and "<script" not in page.text.lower()
    assert "http://" not in page.text.split("<h2>Headers</h2>")[0]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "img-src" not in csp  # no remote content, ever


@pytest.mark.parametrize("shape", ["1,000 parts", "5 MB", "1,000 parts of 5 KB"])
def test_a_hostile_message_is_shown_safely_and_within_bounds(
        console: Gateway, shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Subject whose encoded word hides a CRLF, a header and an <img onerror>; a body of
    1,000 parts, 5 MB, or both: one line of escaped text, a preview of 4 KiB at most, and
    no more of the message walked than the preview's bound."""
    from gateway import preview as previews
    sign_in(console)
    hostile = b"<img src=x onerror=alert(1)>"
    head = (b"Subject: =?utf-8?q?Invoice=0D=0AX-Injected:_yes=0D=0A=0D=0A?=\r\n"
            b" =?utf-8?b?" + base64.b64encode(hostile + b"\r\n<script>x()</script>")
            + b"?=\r\n\tafter the fold\r\nX-Other: 1\r\n")
    html_part = b"Content-Type: text/html\r\n\r\n<p>" + hostile + b"part</p>\r\n"
    if shape == "5 MB":
        message = head + b"Content-Type: text/plain\r\n\r\n" + (hostile + b"\r\n") * 170_000
    else:
        size = 5_000 if shape == "1,000 parts of 5 KB" else 10
        body = b"".join(b"--b\r\n" + html_part.replace(b"part", b"p" * size)
                        for _ in range(1_000))
        message = (head + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body
                   + b"--b\r\nContent-Type: text/plain\r\n\r\nthe last part\r\n--b--\r\n")
    assert len(message) > (4_000_000 if shape != "1,000 parts" else 30_000)
    ident = keep(console, message)
    walked: list[int] = []
    walk = previews.walk

    def counted(data: bytes, *limits: int) -> Any:
        walked.append(len(data))
        return walk(data, *limits)

    monkeypatch.setattr(previews, "walk", counted)
    subject = ("Invoice X-Injected: yes <img src=x onerror=alert(1)> <script>x()</script> "
               "after the fold")
    listing = console.client.client.get("/console/quarantine").text
    page = console.client.client.get(f"/console/quarantine/{ident}").text
    for text in (listing, page):
        assert html.escape(subject) in text
        assert "<img" not in text and "<script" not in text and "\r" not in text
    assert walked and max(walked) <= previews.PREVIEW_SCAN == 1 << 20
    preview = shown_preview(console, ident)
    if shape == "5 MB":  # text: the tag is shown as text, escaped, cut at 4,096 characters
        assert preview == ((hostile.decode() + "\n") * 200)[:4096]
        assert "first 4,096 characters" in page
    else:  # the first HTML part, its tags gone: the text/plain one lies past the bounds
        assert preview == ("p" * size)[:4096]
        bound = "more than 1000 MIME parts" if shape == "1,000 parts" else "first 1 MiB"
        assert bound in page


def test_the_dkim_page_shows_each_keys_record_and_what_to_publish(console: Gateway) -> None:
    keys_dir = Path(console.settings.dkim_keys_dir)
    made = dkim_keys.keygen(keys_dir, "secumail.test", "s1", "rsa", 1024, activate_now=True)
    sign_in(console)
    page = console.client.client.get("/console/dkim")
    assert page.status_code == 200
    assert made.record_name in page.text and html.escape(made.record_value) in page.text
    assert "signing" in page.text and "Publish" not in page.text
