"""`secumail-clamav`: the ClamAV content filter (port 10025, clean mail on to 10026)."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter

from secumail.backend import BackendError
from secumail.filter.metrics import BACKEND_ERRORS
from secumail.filter.service import FilterService, filter_service
from secumail.filter.verdicts import Verdict
from secumail.protocols import clamd
from secumail.protocols.smtp import Envelope
from secumail.runtime import run_service
from secumail.settings import Settings, load_settings
from services.clamav import attachments
from services.clamav.verdict import attachment_verdict, unscanned_verdict, virus_verdict

ATTACHMENT_FINDINGS = Counter(
    "secumail_filter_attachment_findings", "Dangerous attachments found, by rule", ["rule"]
)


def attachment_policy(settings: Settings) -> attachments.AttachmentPolicy:
    return attachments.AttachmentPolicy.from_lists(
        settings.attachment_block, settings.attachment_allow, settings.attachment_max_depth,
        settings.attachment_max_expanded, settings.attachment_max_parts,
        settings.attachment_max_member, settings.attachment_max_seconds)


def make_filter(settings: Settings) -> FilterService:
    scanner = clamd.Clamd(
        settings.clamd_address, settings.scanner_timeout, settings.clamd_stream_max_length
    )
    policy = attachment_policy(settings)
    checking = settings.attachment_action != "off"

    async def inspect(envelope: Envelope, message: bytes) -> Verdict:
        # clamd scans while the attachment rules run: on the loop for small mail without
        # archives (a thread's hand-off cost more than the check), else in a thread.
        scan = asyncio.ensure_future(scanner.scan(message))
        try:
            findings = await check_attachments(message) if checking else []
        except BaseException:
            scan.cancel()
            raise
        try:
            result = await scan
        except BackendError as error:
            BACKEND_ERRORS.labels("clamav").inc()
            if findings:  # no need of clamd to refuse those
                return found(findings, message)
            return unscanned_verdict(str(error), settings.clamav_fail_open, settings.hostname)
        if findings and not result.infected:
            return found(findings, message)
        return virus_verdict(result, settings.virus_action, settings.hostname)

    async def check_attachments(message: bytes) -> list[attachments.Finding]:
        try:
            return attachments.check(message, policy, inline=True)
        except attachments.NeedsThread:
            return await asyncio.to_thread(attachments.check, message, policy)

    def found(findings: list[attachments.Finding], message: bytes) -> Verdict:
        for finding in findings:
            ATTACHMENT_FINDINGS.labels(finding.rule).inc()
        return attachment_verdict(findings, settings.attachment_action, settings.hostname,
                                  message)

    return filter_service(
        "clamav", settings.clamav_listen, settings.clamav_next_hop,
        settings.clamav_allowed_clients, inspect, settings,
    )


def main() -> None:
    settings = load_settings()
    run_service("clamav", settings, lambda: make_filter(settings))


if __name__ == "__main__":
    main()
