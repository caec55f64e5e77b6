"""Reports other receivers send about our domains (secumail/received_reports.py): found in a
mail however packed, parsed, bounded against bombs, kept once, summed per sender; and the
gateway's inbox, API and console page (gateway/dmarc_reports.py, routers/dmarc.py)."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.dmarc_reports import ReportInbox
from secumail import received_reports
from secumail.dmarc_reports import Check, Published, day_start, report_xml
from secumail.received_reports import (
    BadReport,
    ReceivedStore,
    parse_dmarc,
    parse_tlsrpt,
    reports_in,
    spool,
    spooled,
)
from secumail.settings import Settings

ADMIN = "admin-token-0123456789"
DAY = "2026-12-06"
OURS = Published("secumail.test", "r", "r", "reject", "reject", 100, ())
TLS_REPORT = {
    "organization-name": "Company-X", "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "contact-info": "sts-reporting@company-x.example",
    "date-range": {"start-datetime": "2026-12-06T00:00:00Z",
                   "end-datetime": "2026-12-06T23:59:59Z"},
    "policies": [{"policy": {"policy-type": "sts", "policy-domain": "secumail.test",
                             "policy-string": ["version: STSv1", "mode: enforce"]},
                  "summary": {"total-successful-session-count": 5326,
                              "total-failure-session-count": 303},
                  "failure-details": [{"result-type": "certificate-expired",
                                       "sending-mta-ip": "2001:db8:abcd:0012::1",
                                       "failed-session-count": 100}]}]}


def dmarc_xml(report_id: str = "r1", reporter: str = "google.com") -> bytes:
    """A report about secumail.test, as our own generator writes them (RFC 7489 C)."""
    legit = Check("192.0.2.25", "secumail.test", "none", True, True,
                  ("secumail.test", "mfrom", "pass"), (("secumail.test", "s1", "pass"),))
    forged = Check("203.0.113.66", "secumail.test", "reject", False, False,
                   ("evil.test", "mfrom", "pass"), ())
    return report_xml(reporter, f"noreply-dmarc@{reporter}", report_id, DAY, OURS,
                      [(legit, 40), (forged, 7)])


def mail_with(data: bytes, content_type: str, filename: str) -> bytes:
    message = EmailMessage()
    message["From"], message["To"] = "noreply-dmarc@google.com", "dmarc-rua@secumail.test"
    message["Subject"] = "Report domain: secumail.test Submitter: google.com"
    message.set_content("A report.\n")
    maintype, _, subtype = content_type.partition("/")
    message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes()


def zipped(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


# --- finding and reading a report -------------------------------------------------------------

@pytest.mark.parametrize(("packed", "content_type", "name"), [
    (zipped(("google.com!secumail.test!1!2.xml", dmarc_xml())), "application/zip",
     "google.com!secumail.test!1!2.zip"),
    (gzip.compress(dmarc_xml()), "application/gzip", "report.xml.gz"),
    (dmarc_xml(), "text/xml", "report.xml"),
    (gzip.compress(dmarc_xml()), "application/octet-stream", "x!y.xml.gz"),
])
def test_a_dmarc_report_is_found_however_it_is_packed(packed: bytes, content_type: str,
                                                      name: str) -> None:
    [(kind, data)] = reports_in(mail_with(packed, content_type, name))
    report = parse_dmarc(data)
    assert (kind, report.org, report.report_id, report.domain) == (
        "dmarc", "google.com", "r1", "secumail.test")
    assert report.begin == day_start(DAY)
    assert [(r.source_ip, r.count, r.disposition, r.dkim, r.spf) for r in report.rows] == [
        ("192.0.2.25", 40, "none", "pass", "pass"), ("203.0.113.66", 7, "reject", "fail",
                                                     "fail")]


def test_a_tls_report_is_read() -> None:
    data = gzip.compress(json.dumps(TLS_REPORT).encode())
    [(kind, found)] = reports_in(mail_with(data, "application/tlsrpt+gzip", "r.json.gz"))
    report = parse_tlsrpt(found)
    assert (kind, report.org, report.domain) == ("tlsrpt", "Company-X", "secumail.test")
    assert [(p.policy_type, p.successes, p.failures) for p in report.policies] == [
        ("sts", 5326, 303)]


def test_bombs_and_junk_are_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: a report that expands to gigabytes (a zip or gzip bomb), or an XML that
    expands entities (billion laughs), sent to our report address from anywhere."""
    monkeypatch.setattr(received_reports, "MAX_REPORT", 1024 * 1024)
    bomb = b"<feedback>" + b" " * (8 * 1024 * 1024) + b"</feedback>"
    for packed, content_type, name in (
            (zipped(("bomb.xml", bomb)), "application/zip", "bomb.zip"),
            (gzip.compress(bomb), "application/gzip", "bomb.xml.gz"),
            (zipped(("a.xml", dmarc_xml()), ("b.xml", dmarc_xml())), "application/zip", "2.zip"),
            (b"PK\x03\x04 not a zip", "application/zip", "broken.zip"),
            (b"\x1f\x8b not gzip", "application/gzip", "broken.xml.gz")):
        with pytest.raises(BadReport):
            reports_in(mail_with(packed, content_type, name))
    with pytest.raises(BadReport, match="no report"):
        reports_in(mail_with(b"hello", "text/plain", "notes.txt"))
    with pytest.raises(BadReport):
        reports_in(b"x" * (received_reports.MAX_MESSAGE + 1))
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
              b"<feedback><report_metadata><org_name>&lol2;</org_name></report_metadata>"
              b"</feedback>")
    for junk in (laughs, b"<html>no</html>", b"not xml at all",
                 dmarc_xml().replace(b"<count>40</count>", b"<count>lots</count>")):
        with pytest.raises(BadReport):
            parse_dmarc(junk)
    for junk_json in (b"[]", b'{"policies": "x"}', b"{"):
        with pytest.raises(BadReport):
            parse_tlsrpt(junk_json)


# --- what they said ---------------------------------------------------------------------------

def test_reports_are_kept_once_and_summed_per_sender(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = ReceivedStore(str(tmp_path / "received.sqlite"))
    now = day_start(DAY) + 86400 + 3600
    assert store.add(parse_dmarc(dmarc_xml("r1")), now)
    assert not store.add(parse_dmarc(dmarc_xml("r1")), now)  # the same report twice
    assert store.add(parse_dmarc(dmarc_xml("r2", "microsoft.com")), now)
    assert store.add(parse_tlsrpt(json.dumps(TLS_REPORT).encode()), now)
    senders = store.senders(now - 7 * 86400, ["secumail.test"])
    assert [(s.source_ip, s.reporter, s.messages, s.dkim_pass, s.dispositions)
            for s in senders] == [
        ("192.0.2.25", "google.com", 40, 40, {"none": 40}),
        ("192.0.2.25", "microsoft.com", 40, 40, {"none": 40}),
        ("203.0.113.66", "google.com", 7, 0, {"reject": 7}),
        ("203.0.113.66", "microsoft.com", 7, 0, {"reject": 7})]
    assert store.senders(now - 7 * 86400, ["elsewhere.test"]) == []
    assert store.senders(now + 2 * 86400) == []  # reports of an older period
    assert store.tls(now - 7 * 86400) == [("secumail.test", "sts", "Company-X", 5326, 303)]
    monkeypatch.setattr(received_reports, "MAX_REPORTS", 2)
    for n in range(3, 6):
        store.add(parse_dmarc(dmarc_xml(f"r{n}")), now)
    assert store.db.execute("SELECT count(*) FROM reports").fetchone()[0] == 2
    assert {r for (r,) in store.db.execute("SELECT DISTINCT report FROM dmarc_rows")} == {
        r for (r,) in store.db.execute("SELECT id FROM reports")}


def test_the_inbox_reads_the_spool_and_the_admin_sees_who_sends(tmp_path: Path) -> None:
    settings = Settings(admin_token=ADMIN, dmarc_rua_address="dmarc-rua",
                        dmarc_report_db=str(tmp_path / "dmarc" / "reports.sqlite"),
                        domains=["secumail.test"], gateway_hosts=["testserver"],
                        probe_interval=0, tracking=False, quarantine_dir=str(tmp_path / "q"))
    folder = settings.received_reports_spool
    spool(folder, mail_with(gzip.compress(dmarc_xml()), "application/gzip", "r.xml.gz"))
    spool(folder, mail_with(zipped(("bomb.xml", b"<a>" + b" " * (30 * 1024 * 1024) + b"</a>")),
                            "application/zip", "bomb.zip"))
    spool(folder, mail_with(gzip.compress(json.dumps(TLS_REPORT).encode()),
                            "application/tlsrpt+gzip", "r.json.gz"))
    registry = CollectorRegistry()
    inbox = ReportInbox(settings, registry, clock=lambda: day_start(DAY) + 86400)
    assert inbox.read() == 2 and spooled(folder) == []

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("secumail_dmarc_received_reports_total", kind="dmarc", result="kept") == 1
    assert sample("secumail_dmarc_received_reports_total", kind="unknown",
                  result="refused") == 1
    assert sample("secumail_dmarc_reported_messages_total", domain="secumail.test",
                  dmarc="fail") == 7  # the forger's, for an alert
    assert sample("secumail_dmarc_reported_messages_total", domain="secumail.test",
                  dmarc="pass") == 40
    assert sample("secumail_tlsrpt_reported_sessions_total", domain="secumail.test",
                  result="failure") == 303
    with TestClient(create_app(settings, hops=[])) as client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        client.app.state.gateway.inbox = inbox  # type: ignore[attr-defined]
        answer = client.get("/admin/dmarc/received?days=90", headers=auth)
        assert answer.status_code == 200, answer.text
        assert [(s["source_ip"], s["messages"]) for s in answer.json()["senders"]] == [
            ("192.0.2.25", 40), ("203.0.113.66", 7)]
        assert client.get("/admin/dmarc/received", headers={}).status_code == 401
        client.cookies.set("secumail_console", _session(client))
        page = client.get("/console/senders?days=90")
        assert page.status_code == 200 and "203.0.113.66" in page.text
        assert "Who sends as my domain" in page.text


def _session(client: TestClient) -> str:
    signed = client.post("/console/login", data={"token": ADMIN}, follow_redirects=False)
    assert signed.status_code == 303, signed.text
    return signed.cookies["secumail_console"]


def test_the_spool_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(received_reports, "MAX_SPOOLED", 2)
    spool(tmp_path, b"one")
    spool(tmp_path, b"two")
    with pytest.raises(received_reports.SpoolFull):
        spool(tmp_path, b"three")
    assert len(spooled(tmp_path)) == 2
