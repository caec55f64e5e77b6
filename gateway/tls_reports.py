"""TLS reports (RFC 8460) about the mail we send, once a day (SECUMAIL_TLSRPT).

Postfix's container records each session its smtp client had with another domain's MX as a
tracking event (outcome "tls", services/postfix/events.py); the tracking collector hands the
events it stored to `TlsReporter.count`, which counts them per day and domain in the TLS
store (secumail/tlsrpt.py, beside the DMARC store). After midnight UTC each domain that
publishes a `_smtp._tls` record with mailto: addresses gets its report of each day not
reported yet, DKIM-signed, through Postfix: the DMARC reporter's round, with other rows.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from gateway.dmarc_reports import DmarcReporter, ReportRound
from gateway.tracking import StoredEvent
from secumail.dmarc_reports import ReportStore, mailto_addresses, report_id
from secumail.dns import DnsTemporaryError
from secumail.logs import log_event
from secumail.tlsrpt import (
    MAX_RUA,
    Session,
    SessionStore,
    report_json,
    report_mail,
    rua_uris,
)

log = logging.getLogger("secumail.gateway")


class TlsReporter(DmarcReporter):
    report_kind = "TLS report"
    _opening = threading.Lock()  # the collector's thread and a round's may open it at once

    def store(self) -> SessionStore:
        with self._opening:
            if self._store is None:
                path = Path(self.settings.dmarc_report_db).parent / "tlsrpt.sqlite"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._store = SessionStore(str(path))
        assert isinstance(self._store, SessionStore)
        return self._store

    def count(self, service: str, events: Iterable[StoredEvent]) -> None:
        """Count the TLS sessions among the events the collector just stored (in its
        thread). Only Postfix's: a filter, which reads hostile mail, could otherwise make
        us mail made-up reports to anyone's rua."""
        if service != "postfix":
            return
        sessions = []
        for stored in events:
            event = stored.event
            if event.outcome != "tls" or event.service != "postfix" or not event.recipients:
                continue
            domain = event.recipients[0].rpartition("@")[2].lower()
            try:
                sessions.append((event.time, Session.from_detail(event.detail, domain)))
            except ValueError as error:
                log_event(log, "TLS session not counted", logging.WARNING, domain=domain,
                          error=str(error)[:200])
        if not sessions:
            return
        try:
            left_out = self.store().add_sessions(sessions)
        except (OSError, sqlite3.Error) as error:  # the events are stored: these are lost
            log_event(log, "TLS sessions not counted", logging.WARNING,
                      sessions=len(sessions), error=f"{type(error).__name__}: {error}")
            return
        if left_out:
            log_event(log, "TLS sessions not counted: the day's store is full",
                      logging.WARNING, sessions=left_out)

    async def _report(self, store: ReportStore, day: str, domain: str, now: float,
                      done: ReportRound) -> str:
        """Send one domain's report of one day to the addresses its _smtp._tls names."""
        assert isinstance(store, SessionStore)
        rows = await asyncio.to_thread(store.sessions, day, domain)
        if not rows:
            return "nowhere"
        what = f"{day} {domain}"
        try:
            texts = await self.lookup(f"_smtp._tls.{domain}")
        except DnsTemporaryError as error:
            self._note(done.failed, what, f"DNS: {error}", "failed")
            return "failed"
        addresses = mailto_addresses(rua_uris(texts or []))
        if not addresses:
            return "nowhere"  # most domains ask for none
        for address, _ in addresses[MAX_RUA:]:  # nobody's report goes to a crowd
            self._note(done.skipped, f"{what} to {address}", f"past the first {MAX_RUA} "
                       "addresses of the record", "skipped")
        ident = report_id(day, domain)
        org, sender = self.settings.hostname, self.sender()
        report = report_json(org, sender, ident, day, domain, rows)
        sent = failed = False
        for address, limit in addresses[:MAX_RUA]:
            message = report_mail(org, sender, address, ident, day, domain, report, now,
                                  self.settings.hostname)
            result = await self._deliver(done, f"{what} to {address}", address, limit,
                                         message, len(rows))
            sent, failed = sent or result == "sent", failed or result == "failed"
        return "sent" if sent else "failed" if failed else "nowhere"

    def sender(self) -> str:
        return self.settings.tlsrpt_sender
