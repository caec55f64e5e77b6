"""TLS reports (RFC 8460): Postfix's log of its sessions with other domains' MX hosts as
sessions, each with the result a report gives it; the report and its mail as a parser no one
here wrote reads them (parsedmarc); the store; the gateway's round (who gets a report) and
its counting, which takes sessions from Postfix's events only."""

from __future__ import annotations

import asyncio
import email
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import parsedmarc
import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from gateway.tls_reports import TlsReporter
from gateway.tracking import StoredEvent
from secumail import tlsrpt
from secumail.settings import Settings
from secumail.tlsrpt import Policy, Session, SessionStore
from secumail.tracking import MAX_FIELD, Event
from services.postfix.events import TlsSessions
from services.postfix.outbound_tls import cached_policies, sts_policy
from tests.unit.test_dmarc_reports import DAY, NOON, FakeTxt, Mailer

LOG = Path(__file__).parent / "data" / "postfix-outbound-tls.log"
ENFORCE = {"sts-good.test", "sts-selfsigned.test", "sts-wrongname.test", "sts-stripped.test"}


def policy_of(domain: str) -> Policy:
    """The policies the test stack's policy host serves (tests/e2e/mta-sts)."""
    mode = "enforce" if domain in ENFORCE else "testing" if domain == "sts-testing.test" else ""
    if not mode:
        return Policy()
    return sts_policy({"mode": mode, "mx": [f"mx.{domain}"], "max_age": 86400})


def sessions_of(lines: list[str]) -> list[tuple[Event, Session]]:
    reader = TlsSessions("clamav", policy_of, ["secumail.test"], clock=lambda: NOON)
    found = []
    for line in lines:
        for event in reader.feed(line):
            domain = event.recipients[0].rpartition("@")[2]
            found.append((event, Session.from_detail(event.detail, domain)))
    return found


def test_each_session_in_postfixs_log_is_counted_once_with_its_result() -> None:
    found = sessions_of(LOG.read_text().splitlines())
    results = [(s.domain, s.level, s.failure, s.policy.type) for _, s in found]
    assert results == [
        ("sts-good.test", "verified", "", "sts"),
        # testing mode: delivered in clear, and reported (RFC 8461 5)
        ("sts-testing.test", "none", "starttls-not-supported", "sts"),
        ("no-sts.test", "none", "starttls-not-supported", "no-policy-found"),
        ("good.dane.test", "verified", "", "tlsa"),
        ("sts-selfsigned.test", "untrusted", "certificate-not-trusted", "sts"),
        ("sts-wrongname.test", "untrusted", "certificate-host-mismatch", "sts"),
        ("sts-stripped.test", "none", "starttls-not-supported", "sts"),
        ("wrongkey.dane.test", "untrusted", "tlsa-invalid", "tlsa"),
        ("stripped.dane.test", "none", "starttls-not-supported", "tlsa"),
        ("sts-stripped.test", "none", "starttls-not-supported", "sts"),  # retried later
        ("sts-stripped.test", "none", "starttls-not-supported", "sts"),
    ]
    good = found[0][1]
    assert (good.mx, good.ip) == ("mx.sts-good.test", "172.29.126.61")
    assert found[5][1].reason == "num=62:hostname mismatch"
    event = found[0][0]
    assert (event.service, event.outcome, event.queue_id) == ("postfix", "tls", "EFAD017E48F")
    assert event.detail.startswith("TLS to mx.sts-good.test[172.29.126.61]: verified (sts); ")
    assert good.policy.strings == ("version: STSv1", "mode: enforce", "mx: mx.sts-good.test",
                                   "max_age: 86400")


def test_recipients_of_one_session_and_hops_inside_the_stack_add_no_session() -> None:
    lines = [
        "Dec 07 21:09:10 mx postfix/smtp[9]: Verified TLS connection established to "
        "mx.sts-good.test[172.29.126.61]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384",
        *(f"Dec 07 21:09:10 mx postfix/smtp[9]: EFAD017E48F: to=<{r}@sts-good.test>, "
          "relay=mx.sts-good.test[172.29.126.61]:25, delay=0.2, delays=0.1/0/0.04/0, "
          "dsn=2.0.0, status=sent (250 OK)" for r in ("a", "b", "c")),
        # the after-queue hop to the filters, and a delivery no MX answered
        "Dec 07 21:09:11 mx postfix/scan/smtp[10]: 1234567890A: to=<d@example.org>, "
        "relay=clamav[172.29.0.5]:10025, delay=0.1, delays=0/0/0/0, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok: queued as 99)",
        "Dec 07 21:09:12 mx postfix/smtp[9]: ABCDEF12345: to=<e@nowhere.test>, relay=none, "
        "delay=0.1, delays=0/0/0.1/0, dsn=4.4.1, status=deferred (connect to "
        "mx.nowhere.test[192.0.2.1]:25: Connection refused)",
    ]
    found = sessions_of(lines)
    assert [(s.domain, s.level, s.failure) for _, s in found] == [
        ("sts-good.test", "verified", "")]


def smtp(pid: int, text: str) -> str:
    return f"Dec 07 21:09:10 mx postfix/smtp[{pid}]: {text}"


def status(queue_id: str, to: str, mx: str, ip: str, result: str = "sent (250 OK)") -> str:
    return (f"{queue_id}: to=<{to}>, relay={mx}[{ip}]:25, delay=0.2, delays=0.1/0/0.04/0, "
            f"dsn=2.0.0, status={result}")


def test_a_process_next_session_starts_clean_and_each_delivery_is_one() -> None:
    """A session's TLS never passes to the same smtp process's next one: not after a
    delivery no MX answered, nor for the same message's other domain, nor for a retry."""
    now = [NOON]
    reader = TlsSessions("clamav", policy_of, clock=lambda: now[0])
    lines = [
        smtp(7, "Verified TLS connection established to mx1.a.test[192.0.2.1]:25: TLSv1.3"),
        smtp(7, "AAAAA000001: to=<x@a.test>, relay=none, delay=1, delays=0/0/1/0, dsn=4.4.1, "
                "status=deferred (connect to mx1.a.test[192.0.2.1]:25: Connection timed out)"),
        smtp(7, status("BBBBB000002", "x@clear.test", "mx.clear.test", "192.0.2.9")),
        smtp(7, status("BBBBB000002", "y@other.test", "mx.other.test", "192.0.2.10")),
    ]
    found = [Session.from_detail(e.detail, e.recipients[0].rpartition("@")[2])
             for line in lines for e in reader.feed(line)]
    assert [(s.domain, s.level) for s in found] == [("clear.test", "none"), ("other.test", "none")]
    retry = smtp(7, status("CCCCC000003", "postmaster@sts-stripped.test", "mx.sts-stripped.test",
                           "172.29.126.63", "deferred (TLS is required, but was not offered)"))
    assert len(reader.feed(retry)) == 1
    now[0] += 300  # the queue's retry, by the same process
    assert len(reader.feed(retry)) == 1


def test_a_failure_with_an_mx_postfix_moved_past_is_reported_too() -> None:
    reader = TlsSessions("clamav", policy_of, clock=lambda: NOON)
    lines = [
        smtp(8, "server certificate verification failed for mx1.sts-good.test[192.0.2.1]:25: "
                "num=62:hostname mismatch"),
        smtp(8, "Untrusted TLS connection established to mx1.sts-good.test[192.0.2.1]:25: x"),
        smtp(8, "Verified TLS connection established to mx.sts-good.test[192.0.2.2]:25: x"),
        smtp(8, status("DDDDD000004", "postmaster@sts-good.test", "mx.sts-good.test",
                       "192.0.2.2")),
    ]
    found = [Session.from_detail(e.detail, "sts-good.test")
             for line in lines for e in reader.feed(line)]
    assert [(s.mx, s.failure) for s in found] == [
        ("mx1.sts-good.test", "certificate-host-mismatch"), ("mx.sts-good.test", "")]


@pytest.mark.parametrize(("lines", "expected"), [
    # The receiver's own 4xx after TLS was set up is no TLS failure.
    ([smtp(9, "Untrusted TLS connection established to mx.no-sts.test[192.0.2.3]:25: x"),
      smtp(9, status("EEEEE000005", "a@no-sts.test", "mx.no-sts.test", "192.0.2.3",
                     "deferred (host mx.no-sts.test said: 450 4.2.0 certificate greylisted)"))],
     ("untrusted", "", "no-policy-found")),
    ([smtp(9, status("EEEEE000006", "a@sts-good.test", "mx.sts-good.test", "192.0.2.3",
                     "deferred (Cannot start TLS: handshake failure)"))],
     ("none", "validation-failure", "sts")),
    # testing mode, delivered over TLS to an MX its policy does not name
    ([smtp(9, "Trusted TLS connection established to mx.elsewhere.test[192.0.2.4]:25: x"),
      smtp(9, status("EEEEE000007", "a@sts-testing.test", "mx.elsewhere.test", "192.0.2.4"))],
     ("trusted", "validation-failure", "sts")),
    ([smtp(9, status("EEEEE000008", "alice@secumail.test", "mailstore", "172.29.0.9"))], None),
])
def test_what_a_session_is_reported_as(lines: list[str],
                                       expected: tuple[str, str, str] | None) -> None:
    found = [(s.level, s.failure, s.policy.type) for _, s in sessions_of(lines)]
    assert found == ([expected] if expected else [])


def test_a_detail_too_long_for_an_event_keeps_the_session_and_its_policy_type() -> None:
    policy = sts_policy({"mode": "enforce", "max_age": 86400,
                         "mx": [f"mx{i}.a-rather-long-name.example.net" for i in range(30)]})
    session = Session("example.net", "mx1.example.net", "192.0.2.1", "untrusted",
                      "certificate-not-trusted", "x" * 300, policy)
    detail = session.detail()
    assert len(detail) <= MAX_FIELD
    back = Session.from_detail(detail, "example.net")
    assert (back.failure, back.policy.type, back.policy.strings) == (
        "certificate-not-trusted", "sts", ())
    longest = Session("example.net", ("a" * 62 + ".") * 3 + "b" * 60, "2001:db8::" + "f" * 29,
                      "anonymous", "certificate-host-mismatch", "x" * 300, policy)
    assert Session.from_detail(longest.detail(), "example.net").mx == longest.mx
    short = Session("example.net", "mx1.example.net", "192.0.2.1", "verified")
    assert Session.from_detail(short.detail(), "example.net") == short
    with pytest.raises(ValueError):
        Session.from_detail("TLS to mx[1.2.3.4]: verified (sts); [1,2]", "example.net")


def test_the_resolvers_cached_policy_is_the_one_reported(tmp_path: Path) -> None:
    cache = tmp_path / "policies.sqlite"
    now = [940.0]
    read = cached_policies(cache, clock=lambda: now[0])
    assert read("example.net") == Policy()  # no cache yet: no policy
    now[0] += 60  # the answer, kept a minute, is read again
    db = sqlite3.connect(cache)  # as postfix-mta-sts-resolver writes it
    db.execute("create table sts_policy_cache (domain text, ts integer, pol_id text, "
               "pol_body text)")
    rows = [("example.net", 900, "1", {"mode": "testing", "mx": ["*.example.net"],
                                       "max_age": 600}),
            ("old.test", 100, "1", {"mode": "enforce", "mx": ["mx.old.test"], "max_age": 60}),
            ("none.test", 900, "1", {"mode": "none", "mx": [], "max_age": 600})]
    db.executemany("insert into sts_policy_cache values (?, ?, ?, ?)",
                   [(d, t, i, json.dumps(b)) for d, t, i, b in rows])
    db.commit()
    assert read("example.net") == Policy(
        "sts", ("version: STSv1", "mode: testing", "mx: *.example.net", "max_age: 600"),
        ("*.example.net",))
    assert read("old.test") == Policy()  # expired
    assert read("none.test") == Policy()  # mode none: no policy


# --- the report, read by parsedmarc -------------------------------------------------------------

def test_a_report_and_its_mail_parse_with_parsedmarc() -> None:
    sessions = [s for _, s in sessions_of(LOG.read_text().splitlines())]
    stripped = [(s, 1) for s in sessions if s.domain == "sts-stripped.test"]
    good = (replace(stripped[0][0], level="verified", failure="", reason=""), 5)
    report = tlsrpt.report_json("mx.secumail.test", "tls-reports@secumail.test", "id-1", DAY,
                                "sts-stripped.test", [good, *stripped])
    parsed = parsedmarc.parse_smtp_tls_report_json(report)
    assert parsed["begin_date"] == f"{DAY}T00:00:00Z"
    (policy,) = parsed["policies"]  # one policy, its successes and failures
    assert (policy["policy_type"], policy["successful_session_count"],
            policy["failed_session_count"]) == ("sts", 5, 3)
    assert policy["failure_details"] == [{
        "result_type": "starttls-not-supported", "failed_session_count": 3,
        "receiving_ip": "172.29.126.63",
        "receiving_mx_hostname": "mx.sts-stripped.test",
        "failure_reason_code": "TLS is required, but was not offered by host "
                               "mx.sts-stripped.test[172.29.126.63]"}]
    mail = tlsrpt.report_mail("mx.secumail.test", "tls-reports@secumail.test",
                              "tlsrpt@example.net", "id-1", DAY, "sts-stripped.test", report,
                              NOON + 86400, "mx.secumail.test")
    read = parsedmarc.parse_report_email(mail, offline=True)
    assert read["report_type"] == "smtp_tls"
    assert read["report"]["report_id"] == "id-1"
    assert b"multipart/report" in mail and b'report-type="tlsrpt"' in mail
    assert b"TLS-Report-Domain: sts-stripped.test" in mail
    (name,) = [part.get_filename() for part in email.message_from_bytes(mail).walk()
               if part.get_filename()]
    assert name.startswith("mx.secumail.test!sts-stripped.test!") and name.endswith(
        "!id1.json.gz")  # unique-id: letters and digits only (RFC 8460 5.1)


@pytest.mark.parametrize(("texts", "uris"), [
    (["v=TLSRPTv1; rua=mailto:a@example.net,mailto:b@example.net"],
     ["mailto:a@example.net", "mailto:b@example.net"]),
    (["v=TLSRPTv1;rua=https://reports.example.net/v1"], ["https://reports.example.net/v1"]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.net"], ["mailto:a@example.net"]),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], []),  # two
    (["v=TLSRPTv10; rua=mailto:a@example.net"], []),
    ([], []),
])
def test_the_rua_of_a_smtp_tls_record(texts: list[str], uris: list[str]) -> None:
    assert tlsrpt.rua_uris(texts) == uris


# --- the gateway: counting the events, and the daily round ----------------------------------------

def tls_reporter(tmp_path: Path, dns: FakeTxt, mailer: Mailer, now: float) -> TlsReporter:
    settings = Settings(tlsrpt=True, dmarc_report_db=str(tmp_path / "r.sqlite"),
                        domains=["secumail.test"], hostname="mx.secumail.test")
    counter = Counter("secumail_tlsrpt_reports", "", ["result"], registry=CollectorRegistry())
    return TlsReporter(settings, dns, counter, mailer, clock=lambda: now)


def stored_sessions(service: str = "postfix") -> list[StoredEvent]:
    return [StoredEvent(event._replace(service=service), "secumail-postfix-1")
            for event, _ in sessions_of(LOG.read_text().splitlines())]


def test_each_domain_that_asks_gets_its_days_report_once(tmp_path: Path) -> None:
    dns = FakeTxt({"_smtp._tls.sts-stripped.test": ["v=TLSRPTv1; rua=mailto:tls@reports.test"],
                   "_smtp._tls.wrongkey.dane.test": [
                       "v=TLSRPTv1; rua=https://example.net/r,mailto:tls@dane.test"]})
    mailer = Mailer()
    today = tls_reporter(tmp_path, dns, mailer, NOON)
    today.count("postfix", stored_sessions())
    assert asyncio.run(today.run()).sent == []  # the day is not over
    after = tls_reporter(tmp_path, dns, mailer, NOON + 86400)
    done = asyncio.run(after.run())
    assert sorted(done.sent) == [
        f"{DAY} sts-stripped.test to tls@reports.test",
        f"{DAY} wrongkey.dane.test to tls@dane.test"]
    assert done.failed == {} and done.skipped == {}
    by_recipient = dict(mailer.sent)
    report = parsedmarc.parse_report_email(by_recipient["tls@reports.test"],
                                           offline=True)["report"]
    (policy,) = report["policies"]
    assert (policy["policy_domain"], policy["failed_session_count"]) == ("sts-stripped.test", 3)
    dane = parsedmarc.parse_report_email(by_recipient["tls@dane.test"], offline=True)["report"]
    assert dane["policies"][0]["failure_details"][0]["result_type"] == "tlsa-invalid"
    assert asyncio.run(after.run()).sent == []  # sent once
    assert "_smtp._tls.no-sts.test" in dns.queries  # asked, published nothing: no report


def test_a_record_naming_a_crowd_gets_its_report_sent_to_five(tmp_path: Path) -> None:
    """Attack: a domain we mail naming a thousand addresses in its record, to have our
    signed reports sent to all of them every day."""
    crowd = ",".join(f"mailto:victim{i}@victims.test" for i in range(7))
    dns = FakeTxt({"_smtp._tls.sts-good.test": [f"v=TLSRPTv1; rua={crowd}"]})
    mailer = Mailer()
    tls_reporter(tmp_path, dns, mailer, NOON).count("postfix", stored_sessions())
    done = asyncio.run(tls_reporter(tmp_path, dns, mailer, NOON + 86400).run())
    assert [r for r, _ in mailer.sent] == [f"victim{i}@victims.test" for i in range(5)]
    assert len(done.skipped) == 2


def test_a_report_whose_dns_failed_is_sent_the_next_round(tmp_path: Path) -> None:
    dns = FakeTxt({"_smtp._tls.sts-good.test": ["v=TLSRPTv1; rua=mailto:tls@sts-good.test"]},
                  failing={"_smtp._tls.sts-good.test"})
    mailer = Mailer()
    first = tls_reporter(tmp_path, dns, mailer, NOON)
    first.count("postfix", stored_sessions())
    done = asyncio.run(tls_reporter(tmp_path, dns, mailer, NOON + 86400).run())
    assert list(done.failed) == [f"{DAY} sts-good.test"] and mailer.sent == []
    dns.failing.clear()
    again = asyncio.run(tls_reporter(tmp_path, dns, mailer, NOON + 2 * 86400).run())
    assert again.sent == [f"{DAY} sts-good.test to tls@sts-good.test"]


def test_tls_sessions_from_any_service_but_postfix_are_not_counted(tmp_path: Path) -> None:
    """Attack: a filter (it reads hostile mail) serving made-up "tls" events would have us
    mail reports to any address a domain's record names, as often as it likes."""
    reporter = tls_reporter(tmp_path, FakeTxt(), Mailer(), NOON)
    reporter.count("clamav", stored_sessions())
    reporter.count("postfix", stored_sessions("clamav"))
    assert reporter.store().pending(DAY + "z") == []
    reporter.count("postfix", stored_sessions())
    assert len(reporter.store().pending(DAY + "z")) == 9


def test_the_sessions_are_counted_per_day_and_domain(tmp_path: Path) -> None:
    store = SessionStore(str(tmp_path / "t.sqlite"))
    session = Session("example.net", "mx.example.net", "192.0.2.1", "verified")
    assert store.add_sessions([(NOON, session), (NOON + 1, session),
                               (NOON + 86400, session)]) == 0
    assert store.sessions(DAY, "example.net") == [(session, 2)]
    assert store.pending(DAY + "z") == [(DAY, "example.net")]


def test_tls_reports_need_tracking() -> None:
    with pytest.raises(ValidationError, match="SECUMAIL_TRACKING"):
        Settings(tlsrpt=True, tracking=False)
