"""DMARC aggregate reports (RFC 7489 section 7.2): what SecuMail saw of a domain's mail, sent
once a day to the addresses the domain publishes (rua).

The milter counts each DMARC check it makes in memory (`Tally`) and adds the counts to the
record store every minute (`ReportStore`: SQLite in the dmarc volume, shared by the milter's
replicas and the gateway). Identical checks are one row with a count, so a day of 100,000
checks from a few hundred sources stays a few hundred rows. Once a day the gateway makes
yesterday's rows into one report per policy domain (`report_xml`, `report_mail`) and sends
it to each mailto: address of its rua, once an address in another organisation has said it
wants them (`destination_verified`, RFC 7489 7.1). Plain functions and a small store: the
sending is the gateway's (gateway/dmarc_reports.py).
"""

from __future__ import annotations

import calendar
import gzip
import json
import sqlite3
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol, TypeVar
from urllib.parse import unquote

from secumail.dmarc import DmarcRecord, TxtLookup, organizational_domain

DAY = 86400
KEEP_DAYS = 14  # rows kept this long: a report that could not be sent is tried each day
MAX_ROWS_PER_DAY = 200_000  # distinct rows a day may hold; past it, checks are not counted
MAX_PENDING = 50_000  # distinct rows a milter replica holds between two flushes


@dataclass(frozen=True)
class Published:
    """The policy as its domain published it: the report's policy_published."""

    domain: str  # where the record was found (the From domain or its organizational domain)
    adkim: str  # r or s
    aspf: str
    p: str
    sp: str
    pct: int
    rua: tuple[str, ...]

    @classmethod
    def of(cls, record: DmarcRecord, domain: str) -> Published:
        return cls(domain.lower(), "s" if record.strict_dkim else "r",
                   "s" if record.strict_spf else "r", record.policy, record.subdomain_policy,
                   record.percent, record.rua)


class Row(Protocol):
    def key(self) -> str: ...


R = TypeVar("R", bound=Row)


@dataclass(frozen=True)
class Check:
    """One message's DMARC check as a report's row tells it; identical checks are counted."""

    source_ip: str
    header_from: str
    disposition: str  # what SecuMail did: none or reject (it never quarantines for DMARC)
    dkim_aligned: bool  # an aligned DKIM pass
    spf_aligned: bool  # an aligned SPF pass
    spf: tuple[str, str, str]  # (domain, scope: mfrom or helo, result)
    dkim: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, result) per signature
    override: str = ""  # a PolicyOverrideType (local_policy), when the policy was not applied
    override_comment: str = ""

    def key(self) -> str:
        """The row's identity in the store: its fields in order, as compact JSON."""
        return json.dumps(astuple(self), separators=(",", ":"))

    @classmethod
    def from_key(cls, text: str) -> Check:
        (ip, header_from, disposition, dkim_aligned, spf_aligned, spf, dkim, override,
         comment) = json.loads(text)
        return cls(ip, header_from, disposition, dkim_aligned, spf_aligned, tuple(spf),
                   tuple(tuple(d) for d in dkim), override, comment)


def day_of(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


def day_start(day: str) -> int:
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


# --- counting, in the milter ------------------------------------------------------------------

class Tally:
    """A milter replica's checks since its last flush (thread-safe: flushes run in a thread)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self.dropped = 0
        self._counts: dict[tuple[str, str, Check], int] = {}
        self._published: dict[tuple[str, str], Published] = {}
        self._lock = threading.Lock()

    def add(self, moment: float, published: Published, check: Check) -> None:
        row = (day_of(moment), published.domain, check)  # a check is its own key: no copy
        with self._lock:
            if row not in self._counts and len(self._counts) >= self.limit:
                self.dropped += 1
                return
            self._counts[row] = self._counts.get(row, 0) + 1
            self._published[row[:2]] = published

    def take(self) -> tuple[dict[tuple[str, str, Check], int], dict[tuple[str, str], Published]]:
        with self._lock:
            counts, published = self._counts, self._published
            self._counts, self._published = {}, {}
        return counts, published


# --- the record store -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checks (day TEXT, domain TEXT, row TEXT, count INTEGER,
                                   PRIMARY KEY (day, domain, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS published (day TEXT, domain TEXT, record TEXT,
                                      PRIMARY KEY (day, domain));
CREATE TABLE IF NOT EXISTS reports (day TEXT, domain TEXT, result TEXT, at REAL,
                                    PRIMARY KEY (day, domain));
"""


def open_database(path: str, schema: str) -> sqlite3.Connection:
    """A store in the dmarc volume, which the milter's replicas (or the spamd filter) and
    the gateway open at once: WAL, and a wait for the lock rather than an error."""
    db = sqlite3.connect(path, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db


class ReportStore:
    """Counted checks per day and policy domain, the policy each published, and which
    reports went out. Every replica of the milter adds to it; the gateway reads it."""

    def __init__(self, path: str) -> None:
        self.db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def add(self, counts: Mapping[tuple[str, str, R], int],
            published: dict[tuple[str, str], Published]) -> int:
        """Add a replica's counts; how many new rows the day's bound left out. A row is a
        Check here, a TLS session in the TLS-RPT store (secumail/tlsrpt.py)."""
        left_out = 0
        with self._lock, self.db:
            rows: dict[str, int] = {}
            for (day, domain, check), count in counts.items():
                row = check.key()
                if day not in rows:
                    rows[day] = self.db.execute("SELECT count(*) FROM checks WHERE day = ?",
                                                (day,)).fetchone()[0]
                updated = self.db.execute(
                    "UPDATE checks SET count = count + ? WHERE day = ? AND domain = ? AND row = ?",
                    (count, day, domain, row)).rowcount
                if updated:
                    continue
                if rows[day] >= MAX_ROWS_PER_DAY:
                    left_out += 1
                    continue
                self.db.execute("INSERT INTO checks VALUES (?, ?, ?, ?)",
                                (day, domain, row, count))
                rows[day] += 1
            self.db.executemany(
                "INSERT OR REPLACE INTO published VALUES (?, ?, ?)",
                [(day, domain, json.dumps(asdict(p))) for (day, domain), p in published.items()])
        return left_out

    def pending(self, before_day: str) -> list[tuple[str, str]]:
        """(day, domain) of every report not sent yet for a day before `before_day`."""
        with self._lock:
            return self.db.execute(
                "SELECT DISTINCT c.day, c.domain FROM checks c LEFT JOIN reports r"
                " ON r.day = c.day AND r.domain = c.domain"
                " WHERE c.day < ? AND (r.result IS NULL OR r.result = 'failed')"
                " ORDER BY c.day, c.domain", (before_day,)).fetchall()

    def rows(self, day: str, domain: str) -> list[tuple[Check, int]]:
        return [(Check.from_key(row), count) for row, count in self.raw_rows(day, domain)]

    def raw_rows(self, day: str, domain: str) -> list[tuple[str, int]]:
        with self._lock:
            found: list[tuple[str, int]] = self.db.execute(
                "SELECT row, count FROM checks WHERE day = ? AND domain = ? ORDER BY row",
                (day, domain)).fetchall()
        return found

    def published(self, day: str, domain: str) -> Published | None:
        with self._lock:
            found = self.db.execute("SELECT record FROM published WHERE day = ? AND domain = ?",
                                    (day, domain)).fetchone()
        if found is None:
            return None
        raw = json.loads(found[0])
        return Published(**{**raw, "rua": tuple(raw["rua"])})

    def mark(self, day: str, domain: str, result: str, now: float) -> None:
        """sent, failed (tried again next round), or nowhere (no address would take it)."""
        with self._lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
                            (day, domain, result, now))

    def purge(self, now: float, keep_days: int = KEEP_DAYS) -> None:
        oldest = day_of(now - keep_days * DAY)
        with self._lock, self.db:
            for table in ("checks", "published", "reports"):
                self.db.execute(f"DELETE FROM {table} WHERE day < ?", (oldest,))


# --- the report -----------------------------------------------------------------------------

def _add(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
    element = ET.SubElement(parent, name)
    if text is not None:
        element.text = str(text)
    return element


def report_xml(org_name: str, email: str, report_id: str, day: str, published: Published,
               rows: Iterable[tuple[Check, int]]) -> bytes:
    """The report (RFC 7489 appendix C) for one policy domain and one UTC day."""
    feedback = ET.Element("feedback")
    _add(feedback, "version", "1.0")
    metadata = _add(feedback, "report_metadata")
    _add(metadata, "org_name", org_name)
    _add(metadata, "email", email)
    _add(metadata, "report_id", report_id)
    span = _add(metadata, "date_range")
    begin = day_start(day)
    _add(span, "begin", begin)
    _add(span, "end", begin + DAY - 1)
    policy = _add(feedback, "policy_published")
    for name in ("domain", "adkim", "aspf", "p", "sp", "pct"):
        _add(policy, name, getattr(published, name))
    for check, count in rows:
        record = _add(feedback, "record")
        row = _add(record, "row")
        _add(row, "source_ip", check.source_ip)
        _add(row, "count", count)
        evaluated = _add(row, "policy_evaluated")
        _add(evaluated, "disposition", check.disposition)
        _add(evaluated, "dkim", "pass" if check.dkim_aligned else "fail")
        _add(evaluated, "spf", "pass" if check.spf_aligned else "fail")
        if check.override:
            reason = _add(evaluated, "reason")
            _add(reason, "type", check.override)
            if check.override_comment:
                _add(reason, "comment", check.override_comment)
        identifiers = _add(record, "identifiers")
        _add(identifiers, "header_from", check.header_from)
        results = _add(record, "auth_results")
        for domain, selector, result in check.dkim:
            dkim = _add(results, "dkim")
            _add(dkim, "domain", domain)
            if selector:
                _add(dkim, "selector", selector)
            _add(dkim, "result", result)
        spf = _add(results, "spf")
        spf_domain, scope, spf_result = check.spf
        _add(spf, "domain", spf_domain)
        _add(spf, "scope", scope)
        _add(spf, "result", spf_result)
    body: bytes = ET.tostring(feedback, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def report_id(day: str, domain: str) -> str:
    return f"{day}.{domain}.{uuid.uuid4().hex[:12]}"


def report_mail(org_name: str, sender: str, recipient: str, report_id: str, day: str,
                domain: str, xml: bytes, now: float, hostname: str) -> bytes:
    """The report as RFC 7489 7.2.1.1 names and sends it: gzip-compressed, attached."""
    return report_message(
        sender, recipient, report_id, now, hostname,
        subject=f"Report Domain: {domain} Submitter: {org_name} Report-ID: <{report_id}>",
        text=f"DMARC aggregate report from {org_name} for {domain}, {day} (UTC).\n",
        filename=f"{org_name}!{domain}!{_span(day)}!{unique_id(report_id)}.xml.gz",
        report=xml, subtype="gzip")


def _span(day: str) -> str:
    begin = day_start(day)
    return f"{begin}!{begin + DAY - 1}"


def unique_id(report_id: str) -> str:
    """A report id as a file name's unique-id may spell it (1*(ALPHA/DIGIT), RFC 7489
    7.2.1.1 and RFC 8460 5.1)."""
    return "".join(c for c in report_id if c.isascii() and c.isalnum())


def report_message(sender: str, recipient: str, report_id: str, now: float, hostname: str,
                   *, subject: str, text: str, filename: str, report: bytes, subtype: str,
                   headers: dict[str, str] | None = None, report_type: str = "") -> bytes:
    """A report mail: a short text, the report gzip-compressed as an attachment; with
    `report_type`, a multipart/report of that type (RFC 6522; TLS reports)."""
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = subject
    mail["Date"] = formatdate(now, usegmt=True)
    mail["Message-ID"] = make_msgid(domain=hostname)
    mail["Auto-Submitted"] = "auto-generated"
    for name, value in (headers or {}).items():
        mail[name] = value
    mail.set_content(text)
    mail.add_attachment(gzip.compress(report, mtime=0), maintype="application",
                        subtype=subtype, filename=filename)
    if report_type:
        mail.set_type("multipart/report")
        mail.set_param("report-type", report_type)
    data: bytes = mail.as_bytes()
    return data


def mailto_addresses(rua: Iterable[str]) -> list[tuple[str, int | None]]:
    """(address, size limit in bytes or None) of each mailto: URI; other schemes are
    skipped (RFC 7489 6.2: reports go by mail)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    found = []
    for uri in rua:
        if not uri.lower().startswith("mailto:"):
            continue
        target, _, size = uri[7:].partition("!")
        address = unquote(target.split("?")[0]).strip()
        if address.count("@") != 1 or any(c.isspace() or c in "<>," for c in address):
            continue
        limit = None
        if size:
            number, unit = (size[:-1], size[-1].lower()) if size[-1].isalpha() else (size, "")
            if number.isdigit() and unit in ("", *units):
                limit = int(number) * units.get(unit, 1)
        found.append((address, limit))
    return found


async def destination_verified(domain: str, address: str, lookup: TxtLookup) -> bool:
    """RFC 7489 7.1: an address outside the policy domain's organisation takes its reports
    only if it publishes `<domain>._report._dmarc.<its domain>` with v=DMARC1. Without it, a
    domain could have SecuMail mail its reports to anyone (DnsTemporaryError passes up)."""
    target = address.rpartition("@")[2].lower().rstrip(".")
    if organizational_domain(target) == organizational_domain(domain):
        return True
    texts = await lookup(f"{domain}._report._dmarc.{target}")
    return any(t.strip().startswith("v=DMARC1") for t in texts or [])
