"""What a content filter decides, as plain functions of an envelope, a message and what is
known: the verdict's shape, a refusal after queueing, the retry of a message delivered once,
the reply to a message the quarantine has no room for, and the tracking event of it all.
No sockets here: tests/unit/test_filter_verdicts.py calls them directly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from secumail import tracking
from secumail.forwarded import ForwardedClient
from secumail.lostacks import STILL_AWAITED
from secumail.message import header_block_end
from secumail.netaddr import Network
from secumail.protocols.smtp import Envelope

TEMPFAIL_NEXT_HOP = "451 4.4.1 Next hop unavailable, please try again later"
TEMPFAIL_INTERNAL = "451 4.3.0 Internal error, please try again later"


@dataclass(frozen=True)
class Verdict:
    """What a filter decided about one message."""

    action: Literal["deliver", "reject", "drop", "quarantine", "tempfail"]
    label: str  # for metrics and logs: clean, virus, spam, ham, unchecked, error...
    reason: str = ""
    reply: str = ""  # the SMTP reply for reject and tempfail ("554 5.7.1 ...")
    headers: tuple[tuple[str, str], ...] = ()  # added on top when delivering
    remove: frozenset[str] = frozenset()  # headers of the same names, forged or stale
    message: bytes | None = None  # delivered instead of the one received (parts removed)


# A filter's scanner glue (services/clamav/main.py, services/spamd/main.py).
Inspector = Callable[[Envelope, bytes], Awaitable[Verdict]]

INTERNAL_ERROR = Verdict("tempfail", "error", "internal error", reply=TEMPFAIL_INTERNAL)


def refusal_after_queue(verdict: Verdict, client: ForwardedClient,
                        mynetworks: list[Network]) -> Verdict:
    """After queueing (after-queue mode), a filter's refusal makes our own Postfix bounce
    the message to its envelope sender, whom spammers and viruses forge: backscatter. So it
    is kept in quarantine instead, unless the client was trusted (mynetworks, or
    authenticated), whose own users deserve their bounce."""
    if verdict.action != "reject" or client.trusted(mynetworks):
        return verdict
    return replace(verdict, action="quarantine",
                   reason=f"{verdict.reason}; quarantined, not refused: a bounce would go to "
                   "a sender nobody vouches for")


def retry_verdict(earlier: str | None) -> Verdict | None:
    """The verdict on a message the lost-acks record knows (secumail/lostacks.py): delivered
    once already, its client never heard our 250 (`earlier` is the next hop's reply), or
    its first copy's answer still awaited. None: not known, inspect it."""
    if earlier is None:
        return None
    if earlier == STILL_AWAITED:
        return Verdict("tempfail", "duplicate", "an earlier copy's answer is awaited",
                       reply="451 4.3.0 An earlier copy of this message is still being "
                       "delivered, please try again later")
    return Verdict("drop", "duplicate", f"delivered before ({earlier[:100]}); the client "
                   "had not heard so")


def quarantine_full_reply(before_queue: bool, reason: str) -> str:
    """A message to quarantine with no room left: before queue the client keeps it and
    retries; after queue a 4xx would hold it in Postfix's queue for days, and a bounce
    would go to a sender nobody vouches for: dropped (and counted)."""
    if before_queue:
        return "452 4.3.1 Quarantine full, please try again later"
    return f"250 2.0.0 Ok: discarded, quarantine full ({reason})"


def verdict_event(name: str, envelope: Envelope, message: bytes, verdict: Verdict, reply: str,
                  received: float | None = None) -> tracking.Event:
    """The tracking event of one message through a filter: the verdict, and where the
    message went (the next hop's queue id when it took it, "queued as ...")."""
    final = reply.split("\r\n")[-1]
    if verdict.action in ("quarantine", "drop") and final.startswith("2"):
        outcome = "quarantined" if verdict.action == "quarantine" else "dropped"
    else:
        outcome = {"2": "passed", "4": "deferred"}.get(final[:1], "refused")
    detail = f"{verdict.label}: {verdict.reason}" if verdict.reason else verdict.label
    return tracking.event(
        name, outcome, f"{detail}; {final[:200]}", client=envelope.client.get("ADDR", ""),
        sender=envelope.mail_from, recipients=envelope.rcpt_tos,
        queue_id=envelope.client.get("IDENT", ""), next_queue_id=tracking.queued_as(final),
        message_id=tracking.message_id_of(message, header_block_end(message)), at=received)
