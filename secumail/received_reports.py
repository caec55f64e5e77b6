"""Reports other receivers send about our domains: DMARC aggregate reports (RFC 7489, XML,
zip or gzip) and TLS-RPT reports (RFC 8460, JSON, gzip), mailed to our report address
(SECUMAIL_DMARC_RUA_ADDRESS).

The spamd filter keeps such a message in a spool (the dmarc volume) and delivers it nowhere;
the gateway reads the spool, finds the report in each message (`reports_in`), parses it
(`parse_dmarc`, `parse_tlsrpt`) and keeps what it says (`ReceivedStore`), for the API and
the console page "Who sends as my domain". Everything here reads hostile input: each message,
each decompressed report and each parse is bounded, and an XML document that declares a
DTD or an entity is refused (no entity expansion, no external fetch).
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any, Literal

from secumail.dmarc_reports import open_database

MAX_MESSAGE = 10 * 1024 * 1024  # a report mail the filter takes (bigger: 552)
MAX_REPORT = 20 * 1024 * 1024  # a report once decompressed (a bigger one is a bomb)
MAX_PARTS = 20  # MIME parts looked at in one message
MAX_ROWS = 50_000  # records read from one report
KEEP_DAYS = 90
MAX_REPORTS = 20_000  # reports kept (the oldest go first)

Kind = Literal["dmarc", "tlsrpt"]


class BadReport(ValueError):
    """Not a report we can read, or one past a bound: counted, logged, dropped."""


# --- the spool between the spamd filter and the gateway -----------------------------------------

MAX_SPOOLED = 1000  # messages waiting for the gateway; past it the filter answers 452
SPOOL_SUFFIX = ".eml"


class SpoolFull(Exception):
    pass


def spool(folder: Path, message: bytes) -> str:
    """Keep a report mail for the gateway (written whole, then renamed); its file name."""
    folder.mkdir(parents=True, exist_ok=True)
    waiting = sum(1 for entry in os.scandir(folder) if entry.name.endswith(SPOOL_SUFFIX))
    if waiting >= MAX_SPOOLED:
        raise SpoolFull(f"{waiting} report mails wait to be read")
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    temporary = folder / f".{name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(message)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / f"{name}{SPOOL_SUFFIX}")
    return name + SPOOL_SUFFIX


def spooled(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(SPOOL_SUFFIX))
    except FileNotFoundError:
        return []


# --- finding the report in a message ----------------------------------------------------------

def _gunzip(data: bytes) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_REPORT + 1)
    except zlib.error as error:
        raise BadReport(f"not gzip: {error}") from None
    if len(out) > MAX_REPORT or inflater.unconsumed_tail:
        raise BadReport(f"over {MAX_REPORT} bytes once decompressed")
    return out


def _unzip(data: bytes) -> bytes:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) != 1:
            raise BadReport(f"a zip of {len(members)} files, not one report")
        with archive.open(members[0]) as member:
            out = member.read(MAX_REPORT + 1)  # the size the zip claims is not trusted
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError) as error:
        raise BadReport(f"not a readable zip: {error}") from None
    if len(out) > MAX_REPORT:
        raise BadReport(f"over {MAX_REPORT} bytes once decompressed")
    return out


def _kind_of(content_type: str, name: str) -> tuple[Kind, str] | None:
    """(report kind, packing: zip, gzip or plain) from a part's type and file name."""
    name = name.lower()
    if content_type.startswith("application/tlsrpt") or name.endswith((".json", ".json.gz")):
        return "tlsrpt", "gzip" if content_type.endswith("gzip") or name.endswith(".gz") \
            else "plain"
    if content_type in ("application/zip", "application/x-zip-compressed") or \
            name.endswith(".zip"):
        return "dmarc", "zip"
    if content_type in ("application/gzip", "application/x-gzip") or name.endswith(".xml.gz"):
        return "dmarc", "gzip"
    if content_type in ("text/xml", "application/xml") or name.endswith(".xml"):
        return "dmarc", "plain"
    return None


def reports_in(message: bytes) -> list[tuple[Kind, bytes]]:
    """The reports a message carries, decompressed; BadReport when it carries none (or one
    past the bounds)."""
    if len(message) > MAX_MESSAGE:
        raise BadReport(f"a message of {len(message)} bytes")
    parsed = message_from_bytes(message, policy=policy.compat32)
    found: list[tuple[Kind, bytes]] = []
    for index, part in enumerate(parsed.walk()):
        if index >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        kind = _kind_of(part.get_content_type().lower(), part.get_filename() or "")
        if kind is None:
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        report_kind, packing = kind
        data = _unzip(payload) if packing == "zip" else _gunzip(payload) \
            if packing == "gzip" else payload
        found.append((report_kind, data))
    if not found:
        raise BadReport("no report attached")
    return found


# --- reading a report -------------------------------------------------------------------------

@dataclass(frozen=True)
class DmarcRow:
    source_ip: str
    count: int
    disposition: str
    dkim: str  # the DKIM alignment the reporter evaluated: pass or fail
    spf: str
    header_from: str


@dataclass(frozen=True)
class TlsPolicy:
    policy_domain: str
    policy_type: str  # sts, tlsa, no-policy-found
    successes: int
    failures: int


@dataclass(frozen=True)
class ReceivedReport:
    kind: Kind
    org: str  # the reporter
    report_id: str
    begin: int
    end: int
    domain: str  # the policy domain (DMARC), or the first policy's (TLS-RPT)
    rows: tuple[DmarcRow, ...] = ()
    policies: tuple[TlsPolicy, ...] = field(default=())


def _text(element: ET.Element | None, path: str, default: str = "") -> str:
    found = element.find(path) if element is not None else None
    return (found.text or "").strip() if found is not None and found.text else default


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadReport(f"{what} is not a number: {text[:40]!r}") from None


def parse_dmarc(xml: bytes) -> ReceivedReport:
    head = xml[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in xml.lower():
        raise BadReport("an XML document with a DTD or entities")  # no expansion, ever
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise BadReport(f"not XML: {error}") from None
    if root.tag != "feedback":
        raise BadReport(f"not a DMARC report: <{root.tag[:40]}>")
    metadata = root.find("report_metadata")
    records = root.findall("record")
    if len(records) > MAX_ROWS:
        raise BadReport(f"{len(records)} records")
    rows = tuple(
        DmarcRow(_text(r, "row/source_ip"), _int(_text(r, "row/count", "0"), "count"),
                 _text(r, "row/policy_evaluated/disposition", "none"),
                 _text(r, "row/policy_evaluated/dkim", "fail"),
                 _text(r, "row/policy_evaluated/spf", "fail"),
                 _text(r, "identifiers/header_from").lower())
        for r in records)
    return ReceivedReport(
        "dmarc", _text(metadata, "org_name")[:200], _text(metadata, "report_id")[:200],
        _int(_text(metadata, "date_range/begin", "0"), "begin"),
        _int(_text(metadata, "date_range/end", "0"), "end"),
        _text(root, "policy_published/domain").lower()[:253], rows)


def parse_tlsrpt(data: bytes) -> ReceivedReport:
    try:
        raw: Any = json.loads(data)
        policies = []
        for item in raw["policies"][:MAX_ROWS]:
            summary = item.get("summary", {})
            policy_info = item["policy"]
            policies.append(TlsPolicy(
                str(policy_info.get("policy-domain", "")).lower()[:253],
                str(policy_info.get("policy-type", ""))[:40],
                int(summary.get("total-successful-session-count", 0)),
                int(summary.get("total-failure-session-count", 0))))
        span = raw["date-range"]
        begin, end = (int(_epoch(span[k])) for k in ("start-datetime", "end-datetime"))
        return ReceivedReport("tlsrpt", str(raw.get("organization-name", ""))[:200],
                              str(raw.get("report-id", ""))[:200], begin, end,
                              policies[0].policy_domain if policies else "",
                              policies=tuple(policies))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadReport(f"not a TLS-RPT report: {type(error).__name__}: {error}") from None


def _epoch(text: str) -> float:
    """An RFC 3339 date-time (TLS-RPT's), as Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse(kind: Kind, data: bytes) -> ReceivedReport:
    return parse_dmarc(data) if kind == "dmarc" else parse_tlsrpt(data)


# --- what the reports said --------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY, kind TEXT, org TEXT,
    report_id TEXT, begin INTEGER, end INTEGER, domain TEXT, received REAL,
    UNIQUE (kind, org, report_id));
CREATE TABLE IF NOT EXISTS dmarc_rows (report INTEGER, source_ip TEXT, count INTEGER,
    disposition TEXT, dkim TEXT, spf TEXT, header_from TEXT);
CREATE TABLE IF NOT EXISTS tls_policies (report INTEGER, policy_domain TEXT, policy_type TEXT,
    successes INTEGER, failures INTEGER);
CREATE INDEX IF NOT EXISTS reports_by_time ON reports (domain, end);
CREATE INDEX IF NOT EXISTS rows_by_report ON dmarc_rows (report);
CREATE INDEX IF NOT EXISTS policies_by_report ON tls_policies (report);
"""


@dataclass(frozen=True)
class Sender:
    """One source address as the reports of a period saw it send as one of our domains."""

    domain: str
    source_ip: str
    reporter: str
    messages: int
    dkim_pass: int  # messages with an aligned DKIM pass, as the reporter evaluated
    spf_pass: int
    dispositions: dict[str, int]


class ReceivedStore:
    def __init__(self, path: str) -> None:
        self.db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def add(self, report: ReceivedReport, now: float) -> bool:
        """Keep a report; False when it was kept already (a reporter sending it twice)."""
        with self._lock, self.db:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO reports (kind, org, report_id, begin, end, domain,"
                " received) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (report.kind, report.org, report.report_id, report.begin, report.end,
                 report.domain, now))
            if not cursor.rowcount:
                return False
            ident = cursor.lastrowid
            self.db.executemany(
                "INSERT INTO dmarc_rows VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(ident, r.source_ip, r.count, r.disposition, r.dkim, r.spf, r.header_from)
                 for r in report.rows])
            self.db.executemany(
                "INSERT INTO tls_policies VALUES (?, ?, ?, ?, ?)",
                [(ident, p.policy_domain, p.policy_type, p.successes, p.failures)
                 for p in report.policies])
            self._trim(now)
        return True

    def _trim(self, now: float) -> None:
        oldest = now - KEEP_DAYS * 86400
        self.db.execute("DELETE FROM reports WHERE received < ? OR id <= "
                        "(SELECT max(id) FROM reports) - ?", (oldest, MAX_REPORTS))
        for table in ("dmarc_rows", "tls_policies"):
            self.db.execute(f"DELETE FROM {table} WHERE report < "
                            "(SELECT coalesce(min(id), 0) FROM reports)")

    def senders(self, since: float, domains: Iterable[str] | None = None) -> list[Sender]:
        """Per domain, source address and reporter: what the DMARC reports whose period ended
        after `since` say, most messages first."""
        wanted = sorted(domains) if domains is not None else None
        query = ("SELECT r.domain, d.source_ip, r.org, sum(d.count),"
                 " sum(CASE WHEN d.dkim = 'pass' THEN d.count ELSE 0 END),"
                 " sum(CASE WHEN d.spf = 'pass' THEN d.count ELSE 0 END),"
                 " group_concat(d.disposition || ':' || d.count)"
                 " FROM reports r JOIN dmarc_rows d ON d.report = r.id"
                 " WHERE r.kind = 'dmarc' AND r.end >= ?")
        arguments: list[object] = [int(since)]
        if wanted is not None:
            query += f" AND r.domain IN ({','.join('?' * len(wanted))})"
            arguments += wanted
        query += " GROUP BY r.domain, d.source_ip, r.org ORDER BY 4 DESC LIMIT 1000"
        with self._lock:
            found = self.db.execute(query, arguments).fetchall()
        senders = []
        for domain, ip, org, messages, dkim, spf, dispositions in found:
            counted: dict[str, int] = {}
            for item in (dispositions or "").split(","):
                name, _, count = item.rpartition(":")
                counted[name] = counted.get(name, 0) + int(count or 0)
            senders.append(Sender(domain, ip, org, messages, dkim, spf, counted))
        return senders

    def tls(self, since: float) -> list[tuple[str, str, str, int, int]]:
        """(policy domain, policy type, reporter, successes, failures) since `since`."""
        with self._lock:
            return self.db.execute(
                "SELECT p.policy_domain, p.policy_type, r.org, sum(p.successes),"
                " sum(p.failures) FROM reports r JOIN tls_policies p ON p.report = r.id"
                " WHERE r.kind = 'tlsrpt' AND r.end >= ? GROUP BY 1, 2, 3 ORDER BY 5 DESC,"
                " 4 DESC LIMIT 1000", (int(since),)).fetchall()

