"""`secumail-spamd`: the SpamAssassin content filter (port 10026, mail back to Postfix 10027)."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter

from secumail import received_reports, tracking
from secumail.backend import BackendError
from secumail.filter.metrics import BACKEND_ERRORS
from secumail.filter.service import FilterService, filter_service
from secumail.filter.verdicts import Verdict
from secumail.forwarded import ForwardedClient
from secumail.protocols import spamc
from secumail.protocols.smtp import Envelope
from secumail.runtime import run_service
from secumail.settings import Settings, load_settings
from services.spamd import reports
from services.spamd.verdict import oversized_verdict, spam_verdict, unchecked_verdict

REPORTS_LEARNED = Counter("secumail_filter_reports_learned",
                          "Messages users reported, learned by SpamAssassin's Bayes", ["kind"])


def make_filter(settings: Settings) -> FilterService:
    report_addresses = reports.ReportAddresses.for_domains(
        settings.spam_report_address, settings.ham_report_address, settings.domains)
    budget = reports.ReportBudget(settings.report_max_per_hour)

    rua_addresses = settings.dmarc_rua_addresses

    async def inspect(envelope: Envelope, message: bytes) -> Verdict:
        if rua_addresses and rua_addresses & {r.lower() for r in envelope.rcpt_tos}:
            return await keep_received_report(message)
        if kind := report_addresses.kind_of(envelope.rcpt_tos):
            return await learn_report(envelope, message, kind)
        if settings.spam_max_size and len(message) > settings.spam_max_size:
            return oversized_verdict(len(message), settings.spam_max_size)
        try:
            result = await spamc.check(settings.spamassassin_address, message,
                                       settings.scanner_timeout)
        except BackendError as error:
            BACKEND_ERRORS.labels("spamd").inc()
            return unchecked_verdict(str(error), settings.spamd_fail_open)
        return spam_verdict(
            result, settings.spam_tag_score, settings.spam_reject_score, settings.spam_action,
            settings.spam_report_symbols, quarantine_score=settings.spam_quarantine_score,
        )

    async def keep_received_report(message: bytes) -> Verdict:
        """A DMARC or TLS-RPT report about our domains, from any receiver: kept for the
        gateway (which parses it, bounded), never delivered, to its other recipients neither:
        the report address cannot be used to slip mail past the filter."""
        if len(message) > received_reports.MAX_MESSAGE:
            return Verdict("reject", "dmarc-report", f"a report mail of {len(message)} bytes",
                           reply="552 5.3.4 Report too big for this address")
        try:
            name = await asyncio.to_thread(received_reports.spool,
                                           settings.received_reports_spool, message)
        except received_reports.SpoolFull as full:
            return Verdict("tempfail", "dmarc-report", str(full),
                           reply="452 4.3.1 Too many reports waiting, please try again later")
        except OSError as error:
            return Verdict("tempfail", "dmarc-report", f"report spool: {error}",
                           reply="451 4.3.0 The report could not be kept, please try again "
                           "later")
        return Verdict("drop", "dmarc-report", f"kept for the gateway as {name}")

    async def learn_report(envelope: Envelope, message: bytes, kind: spamc.Kind) -> Verdict:
        """A user's report: learned, never delivered; refused from outside."""
        # Only our own users teach: mynetworks, or an authenticated session.
        client = ForwardedClient.from_xforward(envelope.client)
        if not client.trusted(settings.trusted_networks):
            return Verdict("reject", "report", f"a {kind} report from outside",
                           reply="550 5.7.1 Reports are taken from this site's own users only")
        found = reports.reported_messages(message)
        if not found:
            return Verdict("reject", "report", f"a {kind} report with no message attached",
                           reply="550 5.7.1 Attach the message you report (forward it as "
                           "an attachment)")
        allowed = budget.take(envelope.mail_from, len(found))
        if not allowed:
            return Verdict("tempfail", "report", f"over {settings.report_max_per_hour} "
                           "reports this hour", reply="450 4.7.1 Too many reports this hour, "
                           "please try again later")
        learned = 0
        for reported in found[:allowed]:
            try:
                new = await spamc.learn(settings.spamassassin_address, reported, kind,
                                        settings.scanner_timeout)
            except BackendError as error:
                BACKEND_ERRORS.labels("spamd").inc()
                tracking.record(reports.report_event(envelope.mail_from, kind, reported,
                                                     f"not learned: {error}"))
                return unchecked_verdict(str(error), fail_open=False)
            learned += new
            tracking.record(reports.report_event(envelope.mail_from, kind, reported,
                                                 tracking.learned_result(kind, new)))
        for reported in found[allowed:]:
            tracking.record(reports.report_event(
                envelope.mail_from, kind, reported, f"not learned: over the sender's "
                f"{settings.report_max_per_hour} reported messages this hour"))
        REPORTS_LEARNED.labels(kind).inc(allowed)
        return Verdict("drop", "report", f"{allowed} reported as {kind} by "
                       f"{envelope.mail_from}, {learned} new to Bayes")

    return filter_service(
        "spamd", settings.spamd_listen, settings.spamd_next_hop,
        settings.spamd_allowed_clients, inspect, settings,
    )


def main() -> None:
    settings = load_settings()
    run_service("spamd", settings, lambda: make_filter(settings))


if __name__ == "__main__":
    main()
