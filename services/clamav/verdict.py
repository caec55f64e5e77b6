"""What the ClamAV filter does with a scan result: plain functions of the result and settings."""

from __future__ import annotations

from secumail.protocols.clamd import ScanResult
from secumail.relay import Verdict

VIRUS_HEADERS = frozenset({"X-AV-Checked", "X-Virus-Infected", "X-Virus-Scanned"})


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
