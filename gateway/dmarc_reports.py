"""DMARC aggregate reports: ours, sent once a day (SECUMAIL_DMARC_REPORTS), and those other
receivers send about our domains, read (SECUMAIL_DMARC_RUA_ADDRESS).

The milter's replicas count the checks into the report store (secumail/dmarc_reports.py);
after midnight UTC the gateway makes each domain's report of every day not reported yet and
mails it to each mailto: address of the domain's rua, through Postfix (gateway/own_mail.py:
DKIM-signed as our mail). A report no address took is tried again the next round.

The reports others send (DMARC and TLS-RPT) arrive as mail to our report address; the spamd
filter keeps them in a spool, and `ReportInbox` reads them into the received-report store
(secumail/received_reports.py) every minute, for the API and the console.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from gateway.daily import every_day
from gateway.outbound_notice import NoticeSend
from gateway.own_mail import send_own_mail
from secumail.dmarc import TxtLookup
from secumail.dmarc_reports import (
    ReportStore,
    day_of,
    destination_verified,
    mailto_addresses,
    report_id,
    report_mail,
    report_xml,
)
from secumail.dns import DnsTemporaryError
from secumail.logs import log_event
from secumail.protocols.smtp import SmtpRefused, SmtpReply, SmtpUnavailable
from secumail.received_reports import (
    BadReport,
    ReceivedReport,
    ReceivedStore,
    parse,
    reports_in,
    spooled,
)
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

SEND_AT = 15 * 60  # seconds after midnight UTC: the milters have stored the day's last checks


@dataclass
class ReportRound:
    sent: list[str] = field(default_factory=list)  # "DAY DOMAIN to ADDRESS"
    failed: dict[str, str] = field(default_factory=dict)  # the same -> why (tried again)
    skipped: dict[str, str] = field(default_factory=dict)  # the same -> why (never sent)


class DmarcReporter:
    report_kind = "DMARC report"  # in the log

    def __init__(self, settings: Settings, lookup: TxtLookup, counter: Counter,
                 send: NoticeSend | None = None, clock: Callable[[], float] = time.time
                 ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.counter = counter  # secumail_dmarc_reports_total{result}
        self.send = send or self._send
        self.clock = clock
        self._store: ReportStore | None = None
        self._lock = asyncio.Lock()  # the daily round and an admin's "now" never overlap

    async def _send(self, recipient: str, message: bytes) -> SmtpReply:
        return await send_own_mail(self.settings, self.sender(), recipient, message)

    def sender(self) -> str:
        return self.settings.dmarc_report_sender

    def store(self) -> ReportStore:
        if self._store is None:
            path = Path(self.settings.dmarc_report_db)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._store = ReportStore(str(path))
        return self._store

    async def run(self) -> ReportRound:
        """Every report not sent yet, for each day before today."""
        async with self._lock:
            now = self.clock()
            store = await asyncio.to_thread(self.store)
            done = ReportRound()
            for day, domain in await asyncio.to_thread(store.pending, day_of(now)):
                result = await self._report(store, day, domain, now, done)
                await asyncio.to_thread(store.mark, day, domain, result, now)
            await asyncio.to_thread(store.purge, now)
            return done

    async def _report(self, store: ReportStore, day: str, domain: str, now: float,
                      done: ReportRound) -> str:
        """Send one domain's report of one day: sent, failed, or nowhere."""
        published = await asyncio.to_thread(store.published, day, domain)
        rows = await asyncio.to_thread(store.rows, day, domain)
        if published is None or not rows:
            return "nowhere"
        ident = report_id(day, domain)
        org = self.settings.hostname
        xml = report_xml(org, self.sender(), ident, day, published, rows)
        sent = failed = False
        for address, limit in mailto_addresses(published.rua):
            what = f"{day} {domain} to {address}"
            try:
                verified = await destination_verified(domain, address, self.lookup)
            except DnsTemporaryError as error:
                failed = self._note(done.failed, what, f"DNS: {error}", "failed")
                continue
            if not verified:
                self._note(done.skipped, what, f"{address} did not publish "
                           f"{domain}._report._dmarc.{address.rpartition('@')[2]}", "skipped")
                continue
            message = report_mail(org, self.sender(), address, ident, day,
                                  domain, xml, now, self.settings.hostname)
            result = await self._deliver(done, what, address, limit, message, len(rows))
            sent, failed = sent or result == "sent", failed or result == "failed"
        return "sent" if sent else "failed" if failed else "nowhere"

    async def _deliver(self, done: ReportRound, what: str, address: str, limit: int | None,
                       message: bytes, rows: int) -> str:
        """Send one report mail: sent, failed (tried again next round) or skipped."""
        if limit is not None and len(message) > limit:
            self._note(done.skipped, what, f"{len(message)} bytes, over its {limit}", "skipped")
            return "skipped"
        try:
            reply = await self.send(address, message)
            why = "" if reply.ok else str(reply)
        except (SmtpRefused, SmtpUnavailable, OSError) as error:
            why = f"{type(error).__name__}: {error}"
        if why:
            self._note(done.failed, what, why[:200], "failed")
            return "failed"
        done.sent.append(what)
        self.counter.labels("sent").inc()
        log_event(log, f"{self.report_kind} sent", report=what, rows=rows)
        return "sent"

    def _note(self, where: dict[str, str], what: str, why: str, result: str) -> bool:
        where[what] = why
        self.counter.labels(result).inc()
        log_event(log, f"{self.report_kind} {result}", logging.WARNING, report=what,
                  reason=why)
        return True

    async def every_day(self) -> None:
        await every_day(lambda: SEND_AT, self.run, self.clock, self.report_kind)


INBOX_EVERY = 60.0  # seconds between two looks at the report mails the spamd filter kept
INBOX_BATCH = 200  # report mails read in one look (a flood waits for the next)


class ReportInbox:
    """Reads the report mails other receivers sent about our domains (kept by the spamd
    filter: SECUMAIL_DMARC_RUA_ADDRESS) into the received-report store."""

    def __init__(self, settings: Settings, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = settings.received_reports_spool
        self.path = Path(settings.dmarc_report_db).parent / "received.sqlite"
        self.counter = Counter(
            "secumail_dmarc_received_reports", "Reports other receivers sent about our "
            "domains, by kind (dmarc, tlsrpt) and result (kept, repeated, refused)",
            ["kind", "result"], registry=registry)
        # What they said, for alerts: mail in our name that failed DMARC, TLS that failed.
        self.messages = Counter(
            "secumail_dmarc_reported_messages", "Messages in our domains' name that receivers "
            "reported, by domain and DMARC result (pass: an aligned DKIM or SPF pass)",
            ["domain", "dmarc"], registry=registry)
        self.sessions = Counter(
            "secumail_tlsrpt_reported_sessions", "TLS sessions to our servers that receivers "
            "reported, by policy domain and result (success, failure)", ["domain", "result"],
            registry=registry)
        self.clock = clock
        self._store: ReceivedStore | None = None

    def store(self) -> ReceivedStore:
        if self._store is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._store = ReceivedStore(str(self.path))
        return self._store

    def read(self) -> int:
        """Read what waits (INBOX_BATCH mails at most); how many reports were kept. A mail
        whose reports cannot be read is counted, logged and dropped."""
        kept = 0
        for path in spooled(self.folder)[:INBOX_BATCH]:
            try:
                found = reports_in(path.read_bytes())
                for kind, data in found:
                    report = parse(kind, data)
                    new = self.store().add(report, self.clock())
                    kept += new
                    self.counter.labels(kind, "kept" if new else "repeated").inc()
                    if new:
                        self._count(report)
                    log_event(log, "report received", kind=kind, reporter=report.org,
                              domain=report.domain, rows=len(report.rows) or
                              len(report.policies), new=new)
            except BadReport as error:
                self.counter.labels("unknown", "refused").inc()
                log_event(log, "report mail not readable", logging.WARNING, file=path.name,
                          reason=str(error)[:200])
            except OSError as error:
                log_event(log, "report mail not read", logging.WARNING, file=path.name,
                          error=f"{type(error).__name__}: {error}")
                continue  # left in the spool: tried again next look
            path.unlink(missing_ok=True)
        return kept

    def _count(self, report: ReceivedReport) -> None:
        for row in report.rows:
            passed = "pass" in (row.dkim, row.spf)
            self.messages.labels(report.domain, "pass" if passed else "fail").inc(row.count)
        for policy in report.policies:
            self.sessions.labels(policy.policy_domain, "success").inc(policy.successes)
            self.sessions.labels(policy.policy_domain, "failure").inc(policy.failures)

    async def every(self, interval: float = INBOX_EVERY) -> None:
        while True:
            try:
                await asyncio.to_thread(self.read)
            except Exception as error:  # the store unwritable: said, tried again
                log_event(log, "report inbox failed", logging.WARNING,
                          error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(interval)
