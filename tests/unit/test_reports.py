"""Users' spam and ham reports (services/spamd/reports.py): plain functions, no sockets."""

from __future__ import annotations

import ipaddress
from email.message import EmailMessage

from secumail.forwarded import ForwardedClient
from services.spamd.reports import (
    MAX_REPORTED,
    ReportAddresses,
    ReportBudget,
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
