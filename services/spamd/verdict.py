"""What the SpamAssassin filter does with a score: plain functions of the result and settings."""

from __future__ import annotations

import math

from secumail.filter.verdicts import Verdict
from secumail.protocols.spamc import SpamResult

SPAM_HEADERS = frozenset(
    {"X-Spam-Status", "X-Spam-Score", "X-Spam-Flag", "X-Spam-Level", "X-Spam-Checker-Version"}
)


def spam_verdict(
    result: SpamResult, tag_score: float, reject_score: float, action: str, report_symbols: bool,
    *, quarantine_score: float = math.inf,
) -> Verdict:
    """Refused (or quarantined, as `action` says) from `reject_score`; quarantined from
    `quarantine_score` below it: the band where a wanted message may still score, which the
    admin can release (and Bayes then learns as ham); tagged from `tag_score`."""
    is_spam = result.score >= tag_score
    status = f"{'Yes' if is_spam else 'No'}, score={result.score:.1f} required={tag_score:.1f}"
    if report_symbols and result.symbols:
        status += " tests=" + ",".join(result.symbols)
    headers = (
        ("X-Spam-Flag", "YES" if is_spam else "NO"),
        ("X-Spam-Score", f"{result.score:.1f}"),
        ("X-Spam-Status", status),
    )
    reason = f"score {result.score:.1f}"
    if result.score >= reject_score:
        if action == "quarantine":
            return Verdict("quarantine", "spam", reason)
        return Verdict("reject", "spam", reason,
                       reply=f"554 5.7.1 Message refused as spam (score {result.score:.1f})")
    if result.score >= quarantine_score:
        return Verdict("quarantine", "spam", reason)
    return Verdict("deliver", "spam" if is_spam else "ham", reason, headers=headers,
                   remove=SPAM_HEADERS)


def oversized_verdict(size: int, max_size: int) -> Verdict:
    status = f"No, skipped: {size} bytes, over the {max_size} checked"
    return Verdict("deliver", "skipped", f"{size} bytes", headers=(("X-Spam-Status", status),),
                   remove=SPAM_HEADERS)


def unchecked_verdict(error: str, fail_open: bool) -> Verdict:
    if fail_open:
        header = ("X-Spam-Status", "unchecked (spam checker unavailable)")
        return Verdict("deliver", "unchecked", error, headers=(header,), remove=SPAM_HEADERS)
    return Verdict("tempfail", "error", error,
                   reply="451 4.7.1 Spam checker unavailable, please try again later")
