"""Users' quarantine digests (gateway/digest.py): who gets one, what its links may do, and
what they may never do (act for another recipient, act twice, outlive their time, be forged)."""

from __future__ import annotations

import email
import re
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from gateway.app import create_app
from gateway.daily import seconds_to
from gateway.digest import MAX_LISTED, BadLink, DigestLinks, Link, kept_for
from gateway.health import chain_hops
from secumail.greylist_store import SqliteStore
from secumail.netaddr import HostPort
from secumail.protocols.smtp import SmtpReply
from secumail.quarantine import Quarantine, QuarantineRecord
from secumail.settings import Settings

ADMIN = "admin-token-0123456789"
URL = "https://quarantine.secumail.test"
OK = SmtpReply(250, ("2.0.0 Ok: queued as 4F2A",))
LINK = re.compile(r"^(Release|Delete): +(\S+)$", re.M)


def record(ident: str, recipients: tuple[str, ...], at: float) -> QuarantineRecord:
    return QuarantineRecord(id=ident, filter="spamd", verdict="spam", reason="score 9.1",
                            mail_from="<spammer@remote.test>", rcpt_tos=recipients, time=at)


# --- links and who gets a digest, without the app ------------------------------------------

def test_a_link_reads_back_only_as_it_was_made_and_while_it_lasts() -> None:
    links = DigestLinks(SecretStr(ADMIN))
    link = Link("release", "20261207T101010-0123456789ab", "bob@secumail.test", 2_000)
    token = links.make(link)
    assert links.read(token, now=1_000) == link
    odd = Link("delete", link.ident, "a|b@secumail.test", 2_000)
    assert links.read(links.make(odd), now=1_000) == odd
    with pytest.raises(BadLink) as expired:
        links.read(token, now=2_000)
    assert expired.value.expired
    # Another recipient, message or action written into a link's payload: not ours.
    payload, _, mac = token.partition(".")
    for forged in (Link("release", link.ident, "eve@secumail.test", 2_000),
                   Link("delete", link.ident, link.recipient, 2_000),
                   Link("release", link.ident, link.recipient, 9_999)):
        other = links.make(forged).partition(".")[0]
        with pytest.raises(BadLink) as refused:
            links.read(f"{other}.{mac}", now=1_000)
        assert not refused.value.expired
    # Made with another admin token (a new token ends every link), or no link at all.
    for bad in (DigestLinks(SecretStr("another-token-0123456789")).make(link), "", "x.y",
                "%%%.%%%", payload):
        with pytest.raises(BadLink):
            links.read(bad, now=1_000)


def test_only_our_recipients_with_new_mail_get_a_digest() -> None:
    records = [record("20261207T100000-000000000001", ("Bob@secumail.test", "eve@else.test"),
                      100.0),
               record("20261207T100000-000000000002", ("bob@secumail.test",), 50.0),
               record("20261207T100000-000000000003", ("carol@secumail.test",), 200.0)]
    found = kept_for(records, ["secumail.test"], lambda r: {"carol@secumail.test": 250}.get(r, 60))
    assert {r: [x.id[-1] for x in listed] for r, listed in found.items()} == {
        "bob@secumail.test": ["1"]}  # eve is elsewhere; 2 is older; carol's is told already


def test_the_digest_needs_the_address_users_reach_the_gateway_by() -> None:
    with pytest.raises(ValidationError, match="SECUMAIL_QUARANTINE_DIGEST_URL"):
        Settings(quarantine_digest=True)
    with pytest.raises(ValidationError):
        Settings(quarantine_digest=True, quarantine_digest_url="javascript:alert(1)")
    assert Settings(quarantine_digest_url=URL + "/").quarantine_digest_url == URL


# --- the gateway: digests sent, links used ---------------------------------------------------

@dataclass
class Mailer:
    """Postfix's re-injection port, as the digests and releases meet it."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    released: list[tuple[HostPort, QuarantineRecord]] = field(default_factory=list)
    reply: SmtpReply = OK

    async def send(self, recipient: str, message: bytes) -> SmtpReply:
        if self.reply.ok:
            self.sent.append((recipient, message))
        return self.reply

    async def release(self, hop: HostPort, kept: QuarantineRecord, message: bytes
                      ) -> SmtpReply:
        self.released.append((hop, kept))
        return OK

    def links(self, recipient: str) -> dict[str, list[str]]:
        """The link tokens of the last digest sent to `recipient`, by action."""
        message = email.message_from_bytes([m for r, m in self.sent if r == recipient][-1])
        found: dict[str, list[str]] = {"Release": [], "Delete": []}
        for action, url in LINK.findall(message.get_payload(decode=True).decode()):
            assert url.startswith(URL + "/quarantine/link?t=")
            found[action].append(parse_qs(urlsplit(url).query)["t"][0])
        return found


@dataclass
class Site:
    client: TestClient
    quarantine: Quarantine
    mailer: Mailer

    def links_key(self) -> DigestLinks:
        return DigestLinks(SecretStr(ADMIN))

    def digest(self) -> Any:
        answer = self.client.post("/admin/quarantine/digest",
                                  headers={"Authorization": f"Bearer {ADMIN}"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def keep(self, *recipients: str, subject: str = "cheap pills", kept_by: str = "spamd"
             ) -> str:
        envelope = types.SimpleNamespace(mail_from="<spammer@remote.test>", rcpt_tos=recipients,
                                         client={"ADDR": "203.0.113.9"})
        message = f"Subject: {subject}\r\nFrom: spammer@remote.test\r\n\r\nbuy\r\n".encode()
        verdict = "spam" if kept_by == "spamd" else "virus"
        return self.quarantine.store(kept_by, envelope, message, verdict, "score 9.1")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings(
        admin_token=ADMIN, domains=["secumail.test"], hostname="mx.secumail.test",
        quarantine_dir=str(tmp_path / "quarantine"), probe_interval=0, tracking=False,
        gateway_hosts=["testserver"], quarantine_digest=True, quarantine_digest_url=URL,
        probe_mailbox="probe@secumail.test", gateway_wrong_tokens=5)
    mailer = Mailer()

    async def no_replicas(address: str) -> list[str]:
        return []

    app = create_app(settings, resolve=no_replicas, store=lambda: SqliteStore(":memory:"),
                     hops=chain_hops(settings), release_send=mailer.release,
                     notice_send=mailer.send, hostname="gateway-1")
    with TestClient(app, base_url="https://quarantine.secumail.test") as client:
        yield Site(client, Quarantine(settings.quarantine_dir), mailer)


def test_each_recipient_of_ours_gets_their_own_digest_once(site: Site) -> None:
    site.keep("bob@secumail.test", "carol@secumail.test", "eve@elsewhere.test",
              subject="=?utf-8?q?caf=C3=A9?= deals")
    assert site.digest() == {"sent": ["bob@secumail.test", "carol@secumail.test"], "failed": {}}
    recipient, raw = site.mailer.sent[0]
    digest = email.message_from_bytes(raw)
    assert digest["To"] == recipient == "bob@secumail.test"
    assert digest["From"] == "SecuMail quarantine <postmaster@secumail.test>"
    assert digest["Subject"] == "1 message kept in quarantine for you"
    body = digest.get_payload(decode=True).decode()
    assert "From:    spammer@remote.test" in body and "Subject: café deals" in body
    assert "Why:     spam: score 9.1" in body
    page = site.client.get("/quarantine/link",
                           params={"t": site.mailer.links(recipient)["Release"][0]})
    assert "Subject: café deals" in page.text and "Kept for: bob@secumail.test" in page.text
    # Nothing new: nobody is told twice.
    assert site.digest() == {"sent": [], "failed": {}}
    site.keep("bob@secumail.test")
    assert site.digest()["sent"] == ["bob@secumail.test"]


def test_a_release_link_delivers_to_its_recipient_alone_once_and_only_on_its_button(
        site: Site) -> None:
    ident = site.keep("bob@secumail.test", "carol@secumail.test")
    site.digest()
    token = site.mailer.links("bob@secumail.test")["Release"][0]
    page = site.client.get("/quarantine/link", params={"t": token})  # no admin token
    assert page.status_code == 200 and "Release it to me" in page.text
    assert page.headers["referrer-policy"] == "no-referrer"  # the token stays on the page
    assert site.mailer.released == []  # a scanner opening the link changes nothing
    done = site.client.post("/quarantine/link", data={"t": token})
    assert done.status_code == 200 and "Released" in done.text
    [(hop, released)] = site.mailer.released
    assert released.rcpt_tos == ("bob@secumail.test",) and str(hop) == "postfix:10027"
    kept = site.quarantine.record(ident)
    assert kept is not None and kept.rcpt_tos == ("carol@secumail.test",)
    again = site.client.post("/quarantine/link", data={"t": token})
    assert again.status_code == 410 and len(site.mailer.released) == 1
    # Carol deletes hers: the message is gone, and nothing was delivered for her.
    delete = site.mailer.links("carol@secumail.test")["Delete"][0]
    assert site.client.post("/quarantine/link", data={"t": delete}).status_code == 200
    assert site.quarantine.record(ident) is None and len(site.mailer.released) == 1


def test_forged_links_are_refused_and_a_guesser_is_stopped(site: Site) -> None:
    ident = site.keep("bob@secumail.test", "carol@secumail.test")
    site.digest()
    token = site.mailer.links("bob@secumail.test")["Release"][0]
    _, _, mac = token.partition(".")
    # Bob's link rewritten for carol, the admin's token as a link, garbage: 403, nothing done.
    other = DigestLinks(SecretStr("x" * 20)).make(
        Link("release", ident, "carol@secumail.test", int(time.time()) + 999))
    for forged in (f"{other.partition('.')[0]}.{mac}", other, ADMIN, "A" * 5000):
        answer = site.client.post("/quarantine/link", data={"t": forged})
        assert answer.status_code == 403, answer.text
    assert site.mailer.released == []
    # Past SECUMAIL_GATEWAY_WRONG_TOKENS (5) bad links, even a good one waits.
    site.client.get("/quarantine/link", params={"t": "forged.link"})
    locked = site.client.post("/quarantine/link", data={"t": token})
    assert locked.status_code == 429 and locked.headers["retry-after"]
    assert site.mailer.released == []


def test_a_client_opening_links_fast_is_slowed_down(site: Site) -> None:
    site.keep("bob@secumail.test")
    site.digest()
    token = site.mailer.links("bob@secumail.test")["Delete"][0]
    answers = [site.client.get("/quarantine/link", params={"t": token}).status_code
               for _ in range(31)]
    assert answers == [200] * 30 + [429]


def test_a_digest_not_sent_is_sent_next_round_with_what_it_missed(site: Site) -> None:
    site.keep("bob@secumail.test", subject="first")
    site.mailer.reply = SmtpReply(451, ("4.3.0 try later",))
    assert site.digest() == {"sent": [], "failed": {"bob@secumail.test": "451 4.3.0 try later"}}
    site.mailer.reply = OK
    site.keep("bob@secumail.test", subject="second")
    assert site.digest()["sent"] == ["bob@secumail.test"]
    body = email.message_from_bytes(site.mailer.sent[-1][1]).get_payload(decode=True).decode()
    assert "Subject: first" in body and "Subject: second" in body


def test_a_long_digest_lists_the_newest_and_counts_the_rest(site: Site) -> None:
    for n in range(MAX_LISTED + 2):
        site.keep("bob@secumail.test", subject=f"n{n}")
    site.digest()
    links = site.mailer.links("bob@secumail.test")
    assert len(links["Release"]) == MAX_LISTED
    body = email.message_from_bytes(site.mailer.sent[-1][1]).get_payload(decode=True).decode()
    assert "... and 2 more: ask postmaster@secumail.test." in body


def test_links_are_off_with_the_digest(tmp_path: Path) -> None:
    settings = Settings(admin_token=ADMIN, quarantine_dir=str(tmp_path), probe_interval=0,
                        tracking=False, gateway_hosts=["testserver"])
    with TestClient(create_app(settings, hops=[])) as client:
        assert client.get("/quarantine/link", params={"t": "x.y"}).status_code == 404
        assert client.post("/admin/quarantine/digest",
                           headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 409


@pytest.mark.parametrize(("at", "now", "wait"), [
    (7 * 3600, 0.0, 7 * 3600),  # midnight: 7 h to go
    (7 * 3600, 7 * 3600, 86400),  # it is now: tomorrow
    (7 * 3600, 8 * 3600, 23 * 3600),
    (15 * 60, 86400 - 60, 16 * 60),
])
def test_a_daily_round_waits_for_its_time_utc(at: float, now: float, wait: float) -> None:
    assert seconds_to(at, now) == wait


def test_a_virus_is_the_admins_to_release_never_a_users(site: Site) -> None:
    virus = site.keep("bob@secumail.test", subject="invoice", kept_by="clamav")
    assert site.digest()["sent"] == []  # nothing listed: no link made
    # A link made anyway (a token forged with the key: the worst case) acts on nothing.
    token = site.links_key().make(Link("release", virus, "bob@secumail.test",
                                       int(time.time()) + 999))
    assert site.client.post("/quarantine/link", data={"t": token}).status_code == 410
    assert site.mailer.released == [] and site.quarantine.record(virus) is not None
