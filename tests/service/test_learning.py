"""Learning (issue 29): SpamAssassin's Bayes taught over SPAMC TELL by SecuMail's own code,
against a real spamd (local tests, a Bayes database of its own)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from secumail.netaddr import HostPort
from secumail.protocols import spamc
from secumail.protocols.smtp import SmtpReply
from secumail.quarantine import Quarantine, QuarantineRecord
from secumail.settings import Settings
from testkit.processes import free_port, service_env, start_service
from testkit.scanners import Spamd
from testkit.sink import SmtpSink

ADMIN = "learning-admin-token-0123456789"
SPAM = (b"From: Best Deals <deals@offers.test>\r\nTo: bob@secumail.test\r\n"
        b"Subject: Cheap watches and pills, limited offer\r\nMessage-ID: <s1@offers.test>\r\n\r\n"
        b"Replica watches, cheap pills, casino bonus. Click now to claim your prize money!\r\n")
HAM = (b"From: Alice <alice@secumail.test>\r\nTo: bob@secumail.test\r\n"
       b"Subject: Minutes of the budget meeting\r\nMessage-ID: <h1@secumail.test>\r\n\r\n"
       b"Hi Bob, attached are the minutes of Tuesday's budget meeting. See you Friday.\r\n")


@pytest.fixture(scope="module")
def learning_spamd() -> Iterator[Spamd]:
    daemon = Spamd(learning=True).start()
    yield daemon
    daemon.stop()


def score(spamd: Spamd, message: bytes) -> spamc.SpamResult:
    return asyncio.run(spamc.check(spamd.address, message, 60))


def test_a_message_learned_as_spam_scores_bayes_99_on_its_next_copy(
    learning_spamd: Spamd
) -> None:
    address = learning_spamd.address
    assert not any(s.startswith("BAYES_") for s in score(learning_spamd, SPAM).symbols)
    assert asyncio.run(spamc.learn(address, HAM, "ham", 60)) is True
    assert asyncio.run(spamc.learn(address, SPAM, "spam", 60)) is True
    assert asyncio.run(spamc.learn(address, SPAM, "spam", 60)) is False  # known already
    next_copy = SPAM.replace(b"<s1@offers.test>", b"<s2@offers.test>")
    assert {"BAYES_99", "BAYES_999"} & set(score(learning_spamd, next_copy).symbols)
    assert "BAYES_00" in score(learning_spamd, HAM.replace(b"<h1@", b"<h2@")).symbols


def test_a_release_through_the_gateway_teaches_the_real_spamd_ham(
    learning_spamd: Spamd, tmp_path: Path
) -> None:
    """The gateway's release, its next hop faked, its learning real: the wanted message,
    kept as spam, is then known to Bayes as ham."""
    wanted = (b"From: Carol <carol@partner.test>\r\nTo: bob@secumail.test\r\n"
              b"Subject: Invoice for the conference dinner\r\nMessage-ID: <w1@partner.test>"
              b"\r\n\r\nDear Bob, please find the invoice for the conference dinner.\r\n")
    settings = Settings(admin_token=ADMIN, quarantine_dir=str(tmp_path / "q"),
                        spamassassin_address=learning_spamd.address, tracking=False,
                        probe_interval=0, gateway_hosts=["testserver"],
                        dkim_keys_dir=str(tmp_path / "dkim"))

    class Envelope:
        mail_from, rcpt_tos, client = "carol@partner.test", ("bob@secumail.test",), {}

    ident = Quarantine(settings.quarantine_dir).store("spamd", Envelope(), wanted, "spam",
                                                       "score 7.1")

    async def release_send(hop: HostPort, record: QuarantineRecord, message: bytes
                           ) -> SmtpReply:
        return SmtpReply(250, ("2.0.0 Ok: queued as 1A2B",))

    app: Any = create_app(settings, release_send=release_send)
    with TestClient(app) as client:
        released = client.post(f"/admin/quarantine/{ident}/release",
                               headers={"Authorization": f"Bearer {ADMIN}"})
    assert released.status_code == 200, released.text
    assert released.json()["learned"] == "learned as ham"
    # Known as ham now: teaching it again as ham changes nothing.
    assert asyncio.run(spamc.learn(learning_spamd.address, wanted, "ham", 60)) is False


def report(port: int, client: str, sender: str, recipient: str, attached: bytes
           ) -> tuple[int, bytes]:
    """A user forwards `attached` as an attachment to a report address, through the spamd
    filter, Postfix's XFORWARD naming the client."""
    forward = EmailMessage()
    forward["From"], forward["To"], forward["Subject"] = sender, recipient, "Fwd: spam"
    forward.set_content("This one got through.\n")
    forward.add_attachment(email.message_from_bytes(attached, policy=email.policy.default))
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("mx.secumail.test")
        assert smtp.docmd("XFORWARD", f"ADDR={client} NAME=unknown HELO=pc.test "
                          "PROTO=ESMTP")[0] == 250
        assert smtp.mail(sender)[0] == 250
        assert smtp.rcpt(recipient)[0] == 250
        return smtp.data(forward.as_bytes(policy=forward.policy.clone(linesep="\r\n")))


def test_users_report_spam_by_forwarding_it_and_outsiders_cannot(
    learning_spamd: Spamd, sink: SmtpSink, tmp_path: Path
) -> None:
    """Issue 29: a user forwards a spam to spam@; it is learned and delivered to nobody.
    The same report from a client outside mynetworks, unauthenticated, is refused (550) and
    teaches nothing; and a sender's reports are counted (2 an hour here)."""
    port = free_port()
    daemon = start_service("secumail-spamd", service_env(
        spamd_listen=f"127.0.0.1:{port}", spamd_next_hop=f"127.0.0.1:{sink.port}",
        spamassassin_address=learning_spamd.address, quarantine_dir=str(tmp_path / "q"),
        domains="secumail.test", spam_report_address="spam", report_max_per_hour="2",
        mynetworks="127.0.0.0/8,192.0.2.0/24"), "SECUMAIL_SPAMD_LISTEN")
    forged = SPAM.replace(b"<s1@offers.test>", b"<forged@offers.test>").replace(
        b"Cheap watches", b"Lottery winnings")
    try:
        asyncio.run(spamc.learn(learning_spamd.address, HAM, "ham", 60))
        code, reply = report(port, "203.0.113.9", "x@evil.test", "spam@secumail.test", HAM)
        assert (code, reply) == (550, b"5.7.1 Reports are taken from this site's own users "
                                 b"only")
        # Nothing learned from it: the ham is still known as ham, not relearned as spam.
        assert asyncio.run(spamc.learn(learning_spamd.address, HAM, "ham", 60)) is False
        code, reply = report(port, "192.0.2.10", "bob@secumail.test", "spam@secumail.test",
                             forged)
        assert code == 250 and b"discarded (1 reported as spam" in reply, reply
        assert asyncio.run(spamc.learn(learning_spamd.address, forged, "spam", 60)) is False
        assert report(port, "192.0.2.10", "bob@secumail.test", "spam@secumail.test",
                      forged.replace(b"<forged@", b"<f2@"))[0] == 250
        code, reply = report(port, "192.0.2.10", "bob@secumail.test", "spam@secumail.test",
                             forged.replace(b"<forged@", b"<f3@"))
        assert (code, reply) == (450, b"4.7.1 Too many reports this hour, please try again "
                                 b"later")
        assert sink.handler.messages == []  # a report is delivered to nobody
        assert daemon.logged("verdict=report")
        # Each reported message is a tracking event on its own path (its Message-ID): who
        # reported it and what SpamAssassin answered. The refused reports taught nothing.
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/events?after=0",
                                    timeout=10) as answer:
            served = json.loads(answer.read())
        learned = [dict(zip(served["fields"], row, strict=True)) for _, row in served["events"]
                   if row[1] == "learned"]
        assert [(e["service"], e["message_id"]) for e in learned] == [
            ("spamd", "forged@offers.test"), ("spamd", "f2@offers.test")]
        # Learned, or known already: SpamAssassin 4 knows a message by its body too, and
        # these share SPAM's, which another test here may have taught first.
        by = "spam, taught by bob@secumail.test, reporting it by mail: "
        assert {e["detail"] for e in learned} <= {by + "learned as spam",
                                                  by + "known as spam already"}, learned
    finally:
        daemon.stop()


def test_reports_about_our_domains_are_kept_for_the_gateway_and_delivered_to_nobody(
    sink: SmtpSink, tmp_path: Path
) -> None:
    """Issue 33: DMARC and TLS-RPT reports come from any receiver, so the report address
    takes mail from outside; what it takes is kept for the gateway and never relayed, to its
    other recipients neither (the attack: the report address used to slip mail past the
    filter), and a report mail too big is refused."""
    port = free_port()
    db = tmp_path / "dmarc" / "reports.sqlite"
    daemon = start_service("secumail-spamd", service_env(
        spamd_listen=f"127.0.0.1:{port}", spamd_next_hop=f"127.0.0.1:{sink.port}",
        spamassassin_address=str(tmp_path / "no-spamd.sock"),
        quarantine_dir=str(tmp_path / "q"), domains="secumail.test",
        dmarc_rua_address="dmarc-rua", dmarc_report_db=str(db),
        message_size_limit="20000000"), "SECUMAIL_SPAMD_LISTEN")  # past the report's bound
    report = EmailMessage()
    report["From"], report["Subject"] = "noreply-dmarc@google.test", "Report domain: x"
    report.set_content("a report\n")
    report.add_attachment(b"\x1f\x8b report", maintype="application", subtype="gzip",
                          filename="google.test!secumail.test!1!2.xml.gz")
    data = report.as_bytes(policy=report.policy.clone(linesep="\r\n"))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.ehlo("mx.secumail.test")
            assert smtp.docmd("XFORWARD", "ADDR=203.0.113.9 NAME=mail.google.test "
                              "HELO=mail.google.test PROTO=ESMTP")[0] == 250
            refused = smtp.sendmail("noreply-dmarc@google.test",
                                    ["dmarc-rua@secumail.test", "victim@elsewhere.test"], data)
            assert refused == {}
            with pytest.raises(smtplib.SMTPDataError) as too_big:
                smtp.sendmail("noreply-dmarc@google.test", ["dmarc-rua@secumail.test"],
                              data + (b"x" * 998 + b"\r\n") * 10_600)
            assert (too_big.value.smtp_code, too_big.value.smtp_error) == (
                552, b"5.3.4 Report too big for this address")
        [kept] = (db.parent / "received").glob("*.eml")
        assert kept.read_bytes() == data
        assert sink.handler.messages == []  # nobody got it, the victim neither
        assert daemon.logged("verdict=dmarc-report")
    finally:
        daemon.stop()
