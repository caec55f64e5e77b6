"""What the ClamAV filter does with a scan result: plain functions of the result and settings."""

from __future__ import annotations

from secumail.filter.verdicts import Verdict
from secumail.protocols.clamd import ScanResult
from services.clamav.attachments import Finding, strip

ATTACHMENTS_HEADER = "X-SecuMail-Attachments"
# Ours only: the same names arriving from outside are forged, and removed.
VIRUS_HEADERS = frozenset({"X-AV-Checked", "X-Virus-Infected", "X-Virus-Scanned",
                           ATTACHMENTS_HEADER})


def checked_header(hostname: str) -> tuple[str, str]:
    # The seed's clamsmtpd.conf: "Header: X-AV-Checked: ClamAV using ClamSMTP".
    return ("X-AV-Checked", f"ClamAV using SecuMail at {hostname}")


def virus_verdict(result: ScanResult, action: str, hostname: str) -> Verdict:
    if not result.infected:
        return Verdict("deliver", "clean", headers=(checked_header(hostname),),
                       remove=VIRUS_HEADERS)
    reason = f"virus {result.signature}"
    if action == "reject":
        return Verdict("reject", "virus", reason,
                       reply=f"554 5.7.0 Message refused: virus found ({result.signature})")
    if action == "pass":
        headers = (checked_header(hostname), ("X-Virus-Infected", result.signature))
        return Verdict("deliver", "virus", reason, headers=headers, remove=VIRUS_HEADERS)
    return Verdict("quarantine" if action == "quarantine" else "drop", "virus", reason)


def unscanned_verdict(error: str, fail_open: bool, hostname: str) -> Verdict:
    """clamd gave no verdict: keep the mail in Postfix's queue, or let it through marked."""
    if fail_open:
        header = ("X-AV-Checked", f"not scanned at {hostname} (scanner unavailable)")
        return Verdict("deliver", "unchecked", error, headers=(header,), remove=VIRUS_HEADERS)
    return Verdict("tempfail", "error", error,
                   reply="451 4.7.1 Virus scanner unavailable, please try again later")


def attachment_verdict(findings: list[Finding], action: str, hostname: str,
                       message: bytes) -> Verdict:
    """Dangerous attachments found (and no virus): what the setting says to do."""
    reason = "; ".join(f.describe() for f in findings[:5])
    if len(findings) > 5:
        reason += f"; and {len(findings) - 5} more"
    if action == "reject":
        return Verdict("reject", "attachment", reason,
                       reply=f"554 5.7.1 Message refused: attachment not allowed "
                             f"({findings[0].describe()})")
    if action in ("strip", "pass"):
        stripped = strip(message, findings) if action == "strip" else message
        if stripped is not None:
            what = "removed" if action == "strip" else "dangerous, delivered"
            headers = (checked_header(hostname), (ATTACHMENTS_HEADER, f"{what}: {reason}"))
            return Verdict("deliver", "attachment", reason, headers=headers,
                           remove=VIRUS_HEADERS, message=stripped if action == "strip" else None)
    # quarantine, or nothing would be left once stripped.
    return Verdict("quarantine", "attachment", reason)
