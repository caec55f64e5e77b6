"""Users' spam and ham reports (services/spamd/reports.py): plain functions, no sockets."""

from __future__ import annotations

import asyncio
import ipaddress
from email.message import EmailMessage
from pathlib import Path

import pytest

from secumail import tracking
from secumail.backend import BackendError
from secumail.forwarded import ForwardedClient
from secumail.protocols import spamc
from secumail.protocols.smtp import Envelope
from secumail.settings import Settings
from services.spamd.main import make_filter
from services.spamd.reports import (
    MAX_REPORTED,
    ReportAddresses,
    ReportBudget,
    report_event,
    reported_messages,
)

SPAM = b"From: a@offers.test\r\nSubject: pills\r\n\r\ncheap pills\r\n"
TRUSTED = [ipaddress.ip_network("192.0.2.0/24")]


def test_report_addresses_at_each_domain() -> None:
    addresses = ReportAddresses.for_domains("spam", "ham", ["secumail.test", "b.test"])
    assert addresses.kind_of(["Spam@B.test"]) == "spam"
    assert addresses.kind_of(["ham@secumail.test"]) == "ham"
    assert addresses.kind_of(["bob@secumail.test", "spam@secumail.test"]) == "spam"
    assert addresses.kind_of(["bob@secumail.test"]) is None
    assert ReportAddresses.for_domains("", "", ["secumail.test"]).kind_of(["@secumail.test"]) \
        is None  # off


def test_only_our_own_users_may_report() -> None:
    inside = ForwardedClient(ipaddress.ip_address("192.0.2.7"), "pc", "ESMTP")
    outside = ForwardedClient(ipaddress.ip_address("203.0.113.7"), "pc", "ESMTP")
    authenticated = ForwardedClient(ipaddress.ip_address("203.0.113.7"), "pc", "ESMTPSA")
    assert inside.trusted(TRUSTED) and authenticated.trusted(TRUSTED)
    assert not outside.trusted(TRUSTED)
    assert not ForwardedClient(None, "", "").trusted(TRUSTED)


def test_ten_thousand_reports_from_one_sender_are_bounded() -> None:
    now = [0.0]
    budget = ReportBudget(50, clock=lambda: now[0])
    learned = sum(budget.take("bob@secumail.test", 1) for _ in range(10_000))
    assert learned == 50
    assert budget.take("BOB@secumail.test", 5) == 0  # the same sender, any case
    assert budget.take("alice@secumail.test", 5) == 5
    now[0] = 3600.0
    assert budget.take("bob@secumail.test", 70) == 50  # a new hour


def test_the_attached_messages_are_what_is_learned() -> None:
    forward = EmailMessage()
    forward["Subject"] = "Fwd: spam"
    forward.set_content("see attached")
    forward.add_attachment(SPAM, maintype="application", subtype="octet-stream",
                           filename="spam.eml")
    [learned] = reported_messages(forward.as_bytes())
    assert learned.replace(b"\r\n", b"\n") == SPAM.replace(b"\r\n", b"\n")
    inline = b"From: bob@secumail.test\r\nSubject: Fwd\r\n\r\n> cheap pills\r\n"
    assert reported_messages(inline) == []
    many = EmailMessage()
    many.set_content("lots")
    for n in range(MAX_REPORTED + 5):
        many.add_attachment(SPAM, maintype="application", subtype="octet-stream",
                            filename=f"{n}.eml")
    assert len(reported_messages(many.as_bytes())) == MAX_REPORTED


def test_a_reported_message_is_a_learned_event_linked_to_it() -> None:
    reported = (b"Return-Path: <bounce@offers.test>\nDelivered-To: bob@secumail.test\n"
                b"Message-ID: <s1@offers.test>\n" + SPAM.replace(b"\r\n", b"\n"))
    event = report_event("bob@secumail.test", "spam", reported, "known as spam already")
    assert event._replace(time=0.0) == tracking.Event(
        "spamd", "learned", "spam, taught by bob@secumail.test, reporting it by mail: known as "
        "spam already", "", "bounce@offers.test", ("bob@secumail.test",), "", "",
        "s1@offers.test", 0.0)


def forwarded(*attached: bytes) -> bytes:
    forward = EmailMessage()
    forward["From"], forward["To"], forward["Subject"] = "bob@secumail.test", \
        "spam@secumail.test", "Fwd: spam"
    forward.set_content("see attached")
    for n, message in enumerate(attached):
        forward.add_attachment(message, maintype="application", subtype="octet-stream",
                               filename=f"{n}.eml")
    return forward.as_bytes()


def test_each_reported_message_is_an_event_saying_what_spamassassin_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spamd filter's users' reports (services/spamd/main.py): one learned event per
    reported message: learned, known already, past the sender's budget, spamd down."""
    recorded: list[tracking.Event] = []
    monkeypatch.setattr(tracking, "record", recorded.append)
    known: set[bytes] = set()
    down = [False]

    async def learn(address: str, message: bytes, kind: spamc.Kind, timeout: float) -> bool:
        if down[0]:
            raise BackendError("spamd at /run/spamd/spamd.sock: connection refused")
        new = message not in known
        known.add(message)
        return new

    monkeypatch.setattr(spamc, "learn", learn)
    settings = Settings(domains=["secumail.test"], spam_report_address="spam",
                        report_max_per_hour=3, mynetworks=["192.0.2.0/24"],
                        quarantine_dir=str(tmp_path / "q"), tracking=True)
    inspect = make_filter(settings).filter.inspect
    info = Envelope("bob@secumail.test", ("spam@secumail.test",), {"ADDR": "192.0.2.10"})
    ids = [SPAM.replace(b"Subject", f"Message-ID: <r{n}@offers.test>\r\nSubject".encode())
           for n in range(3)]
    verdict = asyncio.run(inspect(info, forwarded(ids[0], ids[0], ids[1], ids[2])))
    assert (verdict.action, verdict.reason) == (
        "drop", "3 reported as spam by bob@secumail.test, 2 new to Bayes")
    by = "spam, taught by bob@secumail.test, reporting it by mail: "
    assert [(e.service, e.outcome, e.message_id, e.detail) for e in recorded] == [
        ("spamd", "learned", "r0@offers.test", by + "learned as spam"),
        ("spamd", "learned", "r0@offers.test", by + "known as spam already"),
        ("spamd", "learned", "r1@offers.test", by + "learned as spam"),
        ("spamd", "learned", "r2@offers.test",
         by + "not learned: over the sender's 3 reported messages this hour")]
    assert all(e.client == "" for e in recorded)  # the report's client is the user's
    recorded.clear()
    down[0] = True
    carol = Envelope("carol@secumail.test", info.rcpt_tos, info.client)
    verdict = asyncio.run(inspect(carol, forwarded(ids[2])))
    assert verdict.action == "tempfail"  # the user's server tries again later
    assert [(e.message_id, e.detail) for e in recorded] == [
        ("r2@offers.test", "spam, taught by carol@secumail.test, reporting it by mail: not "
         "learned: spamd at /run/spamd/spamd.sock: connection refused")]
