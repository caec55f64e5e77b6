"""DMARC aggregate reports (secumail/dmarc_reports.py, gateway/dmarc_reports.py): the milter's
count, the store, the report as a parser no one here wrote reads it (parsedmarc), and who
may receive it."""

from __future__ import annotations

import asyncio
import email
import gzip
import logging
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.dmarc_reports import DmarcReporter
from secumail import dmarc_reports
from secumail.dmarc_reports import (
    Check,
    Published,
    ReportStore,
    Tally,
    day_of,
    day_start,
    destination_verified,
    mailto_addresses,
    report_mail,
    report_xml,
)
from secumail.dns import DnsTemporaryError
from secumail.protocols.smtp import SmtpReply
from secumail.settings import Settings
from tests.unit.test_dkim_milter import MESSAGE, Harness, signed_elsewhere

DAY = "2026-12-06"
NOON = day_start(DAY) + 12 * 3600
POLICY = Published("example.net", "r", "s", "reject", "quarantine", 100,
                   ("mailto:dmarc@example.net",))


def check(ip: str = "203.0.113.7", dkim_aligned: bool = True, **changes: Any) -> Check:
    values: dict[str, Any] = {
        "source_ip": ip, "header_from": "example.net", "disposition": "none",
        "dkim_aligned": dkim_aligned, "spf_aligned": False,
        "spf": ("bounces.example.net", "mfrom", "softfail"),
        "dkim": (("example.net", "s1", "pass" if dkim_aligned else "fail"),), **changes}
    return Check(**values)


class FakeTxt:
    def __init__(self, records: dict[str, list[str]] | None = None,
                 failing: set[str] | None = None) -> None:
        self.records, self.failing, self.queries = records or {}, failing or set(), []

    async def __call__(self, name: str) -> list[str] | None:
        self.queries.append(name)
        if name in self.failing:
            raise DnsTemporaryError(f"{name}: Timeout")
        return self.records.get(name)


# --- counting and storing ---------------------------------------------------------------------

def test_identical_checks_are_one_row_with_their_count(tmp_path: Path) -> None:
    tally = Tally()
    for _ in range(3):
        tally.add(NOON, POLICY, check())
    tally.add(NOON, POLICY, check("198.51.100.9", dkim_aligned=False))
    tally.add(NOON + 86400, POLICY, check())  # the next day: a row of its own
    store = ReportStore(str(tmp_path / "reports.sqlite"))
    assert store.add(*tally.take()) == 0
    tally.add(NOON, POLICY, check())  # another replica's, or the next minute's
    store.add(*tally.take())
    assert tally.take() == ({}, {})
    assert all(Check.from_key(c.key()) == c for c, _ in store.rows(DAY, "example.net"))
    assert sorted((c.source_ip, n) for c, n in store.rows(DAY, "example.net")) == [
        ("198.51.100.9", 1), ("203.0.113.7", 4)]
    assert store.published(DAY, "example.net") == POLICY
    # Reports wait for their day to end; a sent one is not sent again, a failed one is.
    assert store.pending(DAY) == []
    assert store.pending("2026-12-08") == [(DAY, "example.net"), ("2026-12-07", "example.net")]
    store.mark(DAY, "example.net", "sent", NOON)
    store.mark("2026-12-07", "example.net", "failed", NOON)
    assert store.pending("2026-12-08") == [("2026-12-07", "example.net")]
    store.purge(NOON + 30 * 86400)
    assert store.pending("2027-12-31") == [] and store.rows(DAY, "example.net") == []


def test_the_store_and_a_replicas_count_are_bounded(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tally = Tally(limit=2)
    for n in range(4):
        tally.add(NOON, POLICY, check(f"192.0.2.{n}"))
    tally.add(NOON, POLICY, check("192.0.2.0"))  # a row it has: still counted
    assert tally.dropped == 2
    monkeypatch.setattr(dmarc_reports, "MAX_ROWS_PER_DAY", 3)
    store = ReportStore(str(tmp_path / "reports.sqlite"))
    store.add(*tally.take())
    other = Tally()  # another replica
    for n in range(2, 6):
        other.add(NOON, POLICY, check(f"192.0.2.{n}"))
    other.add(NOON, POLICY, check("192.0.2.1"))
    assert store.add(*other.take()) == 3  # one new row fitted; known rows still count
    assert sum(n for _, n in store.rows(DAY, "example.net")) == 5


# --- the report, read by parsedmarc -----------------------------------------------------------

def test_a_report_parses_with_parsedmarc_without_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    rows = [(check(), 3),
            (check("2001:db8::25", dkim_aligned=False, disposition="reject",
                   dkim=(("evil.test", "x", "fail"), ("example.net", "s1", "permerror"))), 1),
            (check("192.0.2.1", dkim_aligned=False, spf=("list.test", "helo", "none"),
                   override="local_policy",
                   override_comment="arc=pass, trusted sealer lists.example"), 2)]
    xml = report_xml("mx.secumail.test", "dmarc-reports@secumail.test", "r-1&x", DAY,
                     POLICY, rows)
    caplog.set_level(logging.WARNING)
    report = parsedmarc.parse_aggregate_report_xml(xml, offline=True)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    metadata = report["report_metadata"]
    assert metadata["errors"] == [] and metadata["report_id"] == "r-1&x"
    assert metadata["org_email"] == "dmarc-reports@secumail.test"
    assert metadata["begin_date"] == "2026-12-06 00:00:00"
    assert metadata["end_date"] == "2026-12-06 23:59:59"
    policy = report["policy_published"]
    assert (policy["domain"], policy["p"], policy["sp"], policy["aspf"]) == (
        "example.net", "reject", "quarantine", "s")
    records = report["records"]
    assert [(r["source"]["ip_address"], r["count"]) for r in records] == [
        ("203.0.113.7", 3), ("2001:db8::25", 1), ("192.0.2.1", 2)]
    assert records[0]["alignment"] == {"spf": False, "dkim": True, "dmarc": True}
    assert records[1]["policy_evaluated"]["disposition"] == "reject"
    assert [d["result"] for d in records[1]["auth_results"]["dkim"]] == ["fail", "permerror"]
    assert records[2]["policy_evaluated"]["policy_override_reasons"] == [
        {"type": "local_policy", "comment": "arc=pass, trusted sealer lists.example"}]
    assert records[2]["auth_results"]["spf"][0]["scope"] == "helo"


def test_the_report_mail_is_named_and_compressed_as_rfc_7489_says() -> None:
    xml = report_xml("mx.secumail.test", "dmarc-reports@secumail.test", "r1", DAY, POLICY,
                     [(check(), 1)])
    raw = report_mail("mx.secumail.test", "dmarc-reports@secumail.test", "dmarc@example.net",
                      "r1", DAY, "example.net", xml, NOON + 86400, "mx.secumail.test")
    mail = email.message_from_bytes(raw)
    assert " ".join(mail["Subject"].split()) == \
        "Report Domain: example.net Submitter: mx.secumail.test Report-ID: <r1>"
    [attachment] = [p for p in mail.walk() if p.get_filename()]
    begin = day_start(DAY)
    assert attachment.get_filename() == \
        f"mx.secumail.test!example.net!{begin}!{begin + 86399}!r1.xml.gz"
    assert attachment.get_content_type() == "application/gzip"
    assert gzip.decompress(attachment.get_payload(decode=True)) == xml
    assert parsedmarc.parse_report_email(raw, offline=True)["report_type"] == "aggregate"


def test_rua_addresses_and_their_size_limits() -> None:
    assert mailto_addresses(["mailto:a@example.net", "https://example.net/r",
                             "mailto:b@example.org!10m", "mailto:c%40x@example.org!20k",
                             "mailto:bad address@x", "mailto:nobody", "mailto:d@x.test!1g"]) == [
        ("a@example.net", None), ("b@example.org", 10 * 1024**2),
        ("d@x.test", 1024**3)]


def test_an_address_elsewhere_gets_reports_only_if_it_agreed() -> None:
    """RFC 7489 7.1, the attack: a domain names a victim's address in its rua to have
    SecuMail mail it every day."""
    dns = FakeTxt({"example.net._report._dmarc.reports.test": ["v=DMARC1"]})
    assert asyncio.run(destination_verified("example.net", "x@mail.example.net", dns))
    assert dns.queries == []  # the same organisation: nothing to ask
    assert asyncio.run(destination_verified("example.net", "r@reports.test", dns))
    assert not asyncio.run(destination_verified("example.net", "victim@victim.test", dns))
    assert not asyncio.run(destination_verified("other.test", "r@reports.test", dns))


# --- the milter counts, the gateway sends ------------------------------------------------------

def test_the_milter_counts_a_check_only_for_domains_that_ask_for_reports(
        tmp_path: Path) -> None:
    harness = Harness(tmp_path, dmarc_reports=True)
    message = signed_elsewhere(harness)  # DKIM-signed by example.org
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject; rua=mailto:d@example.org"]
    harness.spf.results["203.0.113.7"] = "fail"
    harness.send(message)
    harness.send(MESSAGE)  # unsigned, SPF fail: refused by DMARC only with dmarc_reject
    counts, published = harness.milter.tally.take()  # type: ignore[union-attr]
    rows = {row: n for (_, _, row), n in counts.items()}
    assert {(c.dkim_aligned, c.spf_aligned, c.disposition, c.spf[2]) for c in rows} == {
        (True, False, "none", "fail"), (False, False, "none", "fail")}
    assert all(c.source_ip == "203.0.113.7" and c.header_from == "example.org" for c in rows)
    assert [p.rua for p in published.values()] == [("mailto:d@example.org",)]
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]  # no rua: not counted
    harness.send(MESSAGE)
    assert harness.milter.tally.take() == ({}, {})  # type: ignore[union-attr]


class Mailer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.reply = SmtpReply(250, ("2.0.0 Ok",))

    async def __call__(self, recipient: str, message: bytes) -> SmtpReply:
        if self.reply.ok:
            self.sent.append((recipient, message))
        return self.reply


def reporter(tmp_path: Path, dns: FakeTxt, mailer: Mailer, now: float) -> DmarcReporter:
    settings = Settings(dmarc_reports=True, dmarc_report_db=str(tmp_path / "r.sqlite"),
                        domains=["secumail.test"], hostname="mx.secumail.test")
    counter = Counter("secumail_dmarc_reports", "", ["result"], registry=CollectorRegistry())
    return DmarcReporter(settings, dns, counter, mailer, clock=lambda: now)


def test_each_domain_gets_its_report_once_where_it_may_receive_it(tmp_path: Path) -> None:
    tally = Tally()
    rua = ("mailto:dmarc@example.net", "mailto:agg@reports.test!50k",
           "mailto:victim@victim.test")
    tally.add(NOON, Published(**{**POLICY.__dict__, "rua": rua}), check())
    store = ReportStore(str(tmp_path / "r.sqlite"))
    store.add(*tally.take())
    dns = FakeTxt({"example.net._report._dmarc.reports.test": ["v=DMARC1;"]})
    mailer = Mailer()
    today = reporter(tmp_path, dns, mailer, NOON)
    assert asyncio.run(today.run()).sent == []  # the day is not over
    after = reporter(tmp_path, dns, mailer, NOON + 86400)
    done = asyncio.run(after.run())
    assert done.sent == [f"{DAY} example.net to dmarc@example.net",
                         f"{DAY} example.net to agg@reports.test"]
    assert list(done.skipped) == [f"{DAY} example.net to victim@victim.test"]
    assert [r for r, _ in mailer.sent] == ["dmarc@example.net", "agg@reports.test"]
    report = parsedmarc.parse_report_email(mailer.sent[0][1], offline=True)["report"]
    assert report["records"][0]["count"] == 1
    assert asyncio.run(after.run()).sent == []  # sent once


def test_a_report_nobody_took_is_sent_the_next_round(tmp_path: Path) -> None:
    tally = Tally()
    tally.add(NOON, POLICY, check())
    ReportStore(str(tmp_path / "r.sqlite")).add(*tally.take())
    mailer = Mailer()
    mailer.reply = SmtpReply(451, ("4.3.0 try later",))
    first = asyncio.run(reporter(tmp_path, FakeTxt(), mailer, NOON + 86400).run())
    assert list(first.failed.values()) == ["451 4.3.0 try later"]
    mailer.reply = SmtpReply(250, ("2.0.0 Ok",))
    second = asyncio.run(reporter(tmp_path, FakeTxt(), mailer, NOON + 2 * 86400).run())
    assert second.sent == [f"{DAY} example.net to dmarc@example.net"]
    assert day_of(NOON) == DAY
