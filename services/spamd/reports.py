"""Users report spam and ham without an admin (issue 29): a message forwarded as an
attachment (message/rfc822, or a .eml file) to a report address of one of our domains
(SECUMAIL_SPAM_REPORT_ADDRESS `spam` makes spam@ each domain; SECUMAIL_HAM_REPORT_ADDRESS
alike) teaches SpamAssassin's Bayes what it holds. Plain functions; the spamd filter calls
spamd's TELL with what they return.

Learning must not be poisoned from outside: a report is taken only from a trusted client
(SECUMAIL_MYNETWORKS) or an authenticated one, and each sender may report at most
SECUMAIL_REPORT_MAX_PER_HOUR messages an hour (per replica); a report from anywhere else is
refused in the session, and nothing is learned.

Each reported message is a `learned` event in message tracking (report_event), on the path
of the message reported (its Message-ID): who reported it, and what SpamAssassin answered.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message

from secumail import tracking
from secumail.protocols.spamc import Kind

MAX_REPORTED = 20  # messages taken from one report (the rest is left out)
MAX_SENDERS = 10_000  # senders whose reports are counted at once


@dataclass(frozen=True)
class ReportAddresses:
    spam: frozenset[str]
    ham: frozenset[str]

    @classmethod
    def for_domains(cls, spam_local: str, ham_local: str,
                    domains: Iterable[str]) -> ReportAddresses:
        domains = list(domains)
        return cls(frozenset(f"{spam_local}@{d}".lower() for d in domains if spam_local),
                   frozenset(f"{ham_local}@{d}".lower() for d in domains if ham_local))

    def kind_of(self, recipients: Iterable[str]) -> Kind | None:
        """spam or ham when the message goes to a report address; None for other mail. A
        message to report addresses and to people too is a report all the same (it is not
        delivered to them): a user must not be able to slip mail past the filter that way."""
        addresses = {r.lower() for r in recipients}
        if addresses & self.spam:
            return "spam"
        if addresses & self.ham:
            return "ham"
        return None


class ReportBudget:
    """How many messages each sender reported in the last hour (its newest senders kept)."""

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self.clock = clock
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def take(self, sender: str, count: int) -> int:
        """How many of `count` reported messages this sender may still have learned now."""
        now = self.clock()
        started, used = self._counts.pop(sender.lower(), (now, 0))
        if now - started >= 3600:
            started, used = now, 0
        allowed = max(0, min(count, self.per_hour - used))
        self._counts[sender.lower()] = (started, used + allowed)
        while len(self._counts) > MAX_SENDERS:
            self._counts.popitem(last=False)
        return allowed


def reported_messages(report: bytes) -> list[bytes]:
    """The messages a report carries as attachments: message/rfc822 parts and .eml files,
    MAX_REPORTED at most; none when the user forwarded the text inline."""
    parsed = message_from_bytes(report, policy=policy.compat32)
    found: list[bytes] = []
    for part in parsed.walk():
        if len(found) >= MAX_REPORTED:
            break
        if part.get_content_type() == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                found.append(inner[0].as_bytes())
        elif (part.get_filename() or "").lower().endswith(".eml"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and payload.strip():
                found.append(payload)
    return found


def report_event(reporter: str, kind: Kind, reported: bytes, result: str) -> tracking.Event:
    """The tracking event of one reported message: taught by `reporter` (the report's
    envelope sender), `result` what SpamAssassin answered. Its client and envelope are not
    the report's (that is the user's): the reported copy's own, as far as it records them."""
    return tracking.learning_event("spamd", kind, f"{reporter or '<>'}, reporting it by mail",
                                   result, reported)
