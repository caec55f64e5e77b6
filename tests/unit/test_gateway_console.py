"""The operator's console without a browser (FastAPI's test client): sign-in, the cookie's
flags, CSRF, what a request without a session gets, and escaping of what mail wrote."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from gateway.auth import ConsoleSessions, WrongTokens
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
         "/console/quarantine/{id}", "/console/greylist", "/console/health"]
ACTIONS = [("/console/quarantine/{id}/release", {}),
           ("/console/quarantine/{id}/release", {"learn": "false"}),
           ("/console/quarantine/{id}/learn", {"kind": "spam"}),
           ("/console/quarantine/{id}/delete", {"confirm": "yes"}),
           ("/console/greylist/whitelist", {"kind": "client", "value": "192.0.2.9"}),
           ("/console/greylist/whitelist/remove", {"kind": "recipient", "value": "abuse@"}),
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
