"""The DKIM milter in the stack: outbound mail leaves signed, inbound mail gets one
Authentication-Results header with the SPF result the policy service found."""

from __future__ import annotations

import gzip
import json
import re
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid

import dkim

from secumail.dmarc_reports import Check, Published, report_xml
from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_gateway import Gateway
from tests.e2e.test_stack import attempt, deliver


def test_outbound_mail_is_signed_with_a_key_made_by_the_key_tool(stack: Stack) -> None:
    made = stack.exec("dkim", "secumail-dkim", "keygen", "secumail.test", "--selector", "e2e")
    assert made.returncode == 0, made.stderr
    record = re.search(r"value: (v=DKIM1;.*)", made.stdout)
    assert record, made.stdout
    time.sleep(2)  # the milter notices new keys within a second
    subject = "signed " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="bob@secumail.test", to="carol@elsewhere.test")
    code, reply = attempt(stack, "127.0.0.40", "bob@secumail.test", "carol@elsewhere.test", message)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.sink() if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("dkim")[-3000:]
        time.sleep(1)
    signed = found[0].as_bytes()
    assert b"d=secumail.test" in signed and b"s=e2e" in signed
    published = record.group(1).encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return published if name == b"e2e._domainkey.secumail.test." else b""

    assert dkim.verify(signed, dnsfunc=dns)


def test_inbound_mail_gets_authentication_results(stack: Stack) -> None:
    sender = f"erin.{uuid.uuid4().hex[:8]}@remote.test"
    subject = "inbound " + sender
    forged = b"Authentication-Results: mx.secumail.test; dkim=pass\r\n"
    message = forged + mail.plain(subject=subject, sender=sender)
    assert deliver(stack, "203.0.113.50", sender, "bob@secumail.test", message)[0] == 250
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("dkim")[-3000:]
        time.sleep(1)
    [results] = found[0].get_all("Authentication-Results")  # the forged one is gone
    assert results.startswith("mx.secumail.test;")
    assert "spf=pass" in results and "dkim=none" in results


STORE_SCRIPT = """
import json, sys
from secumail.dmarc_reports import ReportStore
store = ReportStore("/var/lib/secumail/dmarc/reports.sqlite")
print(json.dumps(store.db.execute("SELECT domain, row, count FROM checks").fetchall()))
"""
INBOX_SCRIPT = """
from prometheus_client import CollectorRegistry
from gateway.dmarc_reports import ReportInbox
from secumail.settings import load_settings
print(ReportInbox(load_settings(), CollectorRegistry()).read())
"""


def test_dmarc_checks_reach_the_report_store_and_reports_about_us_are_read(
        stack: Stack) -> None:
    """Issue 33 in the stack: the milter's counts reach the store the gateway reports from
    (the dmarc volume, written by dkim, read by the gateway), and a report another receiver
    mails to dmarc-rua@ goes through Postfix and the filters into the gateway's page."""
    subject = "dmarc " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="news@partner.test", to="bob@secumail.test")
    assert deliver(stack, "203.0.113.8", "news@partner.test", "bob@secumail.test",
                   message)[0] == 250
    deadline = time.monotonic() + 60  # the milter writes every 2 s here (60 by default)
    while not [row for row in json.loads(stack.exec(
            "gateway", "/opt/secumail/bin/python", "-c", STORE_SCRIPT).stdout or "[]")
            if row[0] == "partner.test" and '"203.0.113.8"' in row[1]]:
        assert time.monotonic() < deadline, stack.logs("dkim")[-3000:]
        time.sleep(2)

    xml = report_xml("google.test", "noreply@google.test", uuid.uuid4().hex, "2026-12-06",
                     Published("secumail.test", "r", "r", "none", "none", 100, ()),
                     [(Check("198.51.100.99", "secumail.test", "none", False, False,
                             ("spoofer.test", "mfrom", "pass")), 12)])
    report = EmailMessage()
    report["From"], report["To"] = "dmarc@remote.test", "dmarc-rua@secumail.test"
    report["Subject"], report["Message-ID"] = "Report Domain: secumail.test", make_msgid()
    report.set_content("A DMARC aggregate report.\n")
    report.add_attachment(gzip.compress(xml), maintype="application", subtype="gzip",
                          filename="google.test!secumail.test!1!2.xml.gz")
    code, reply = deliver(stack, "203.0.113.7", "dmarc@remote.test", "dmarc-rua@secumail.test",
                          report.as_bytes(policy=report.policy.clone(linesep="\r\n")))
    assert code == 250, reply
    read = stack.exec("gateway", "/opt/secumail/bin/python", "-c", INBOX_SCRIPT)
    assert read.returncode == 0, read.stderr
    status, found = Gateway(stack).request("GET", "/admin/dmarc/received?days=90")
    assert status == 200, found
    assert ("198.51.100.99", 12, 0) in [(s["source_ip"], s["messages"], s["dkim_pass"])
                                        for s in found["senders"]], (read.stdout, found)
    assert stack.mailbox("dmarc-rua") == []  # delivered to nobody
