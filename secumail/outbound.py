"""Outbound limits: how much mail the site's own hosts and users may send.

A compromised host in SECUMAIL_MYNETWORKS or a stolen account can send a hundred thousand
spams an hour and put the site's address on every blocklist. The policy service counts what
each sender address, client address and authenticated user sends (messages and recipients per
minute, hour or day) and answers 450 past a limit: the sending MTA keeps the mail and retries.
A subject far past its limit (SECUMAIL_OUTBOUND_HOLD_FACTOR times it) is held: all its mail is
deferred until the admin releases it (gateway API and console), and the admin is told.

Counting is a GCRA (a leaky bucket kept as one timestamp per counter, its "theoretical
arrival time"): `N/hour` lets N go at once, then one more every hour/N. It has no window edge
at which a sender gets 2N through, and it costs one value per counter. What is counted, and
how a bucket moves, are plain functions here; the stores (secumail/outbound_store.py) apply
them atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

Scope = Literal["sender", "client", "user"]
Kind = Literal["messages", "recipients"]
SCOPES: tuple[Scope, ...] = ("sender", "client", "user")
PERIODS = {"minute": 60, "hour": 3600, "day": 86400}
# A small site's hosts and users: enough for a newsletter to a few hundred, far too little
# for a spam run. Each entry `scope:kind:count/period`.
DEFAULT_OUTBOUND_LIMITS = (
    "sender:messages:100/hour,sender:recipients:500/hour,sender:messages:1000/day,"
    "client:messages:60/minute,client:messages:500/hour,client:recipients:2000/hour,"
    "user:messages:100/hour,user:recipients:500/hour,user:messages:1000/day"
)
_ENTRY = re.compile(r"^(sender|client|user):(messages|recipients):([0-9]{1,9})/(minute|hour|day)$")


@dataclass(frozen=True)
class Limit:
    scope: Scope
    kind: Kind
    count: int
    period: str  # minute, hour or day

    @property
    def seconds(self) -> int:
        return PERIODS[self.period]

    @property
    def text(self) -> str:
        return f"{self.scope}:{self.kind}:{self.count}/{self.period}"


def parse_limits(text: str) -> list[Limit]:
    """`sender:messages:100/hour,client:recipients:2000/hour` -> limits; empty: none (off).
    ValueError naming the entry that is not one."""
    limits = []
    for entry in (e.strip().lower() for e in text.split(",")):
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None or int(match[3]) < 1:
            raise ValueError(f"bad outbound limit {entry!r}: scope:kind:count/period, scope "
                             "sender|client|user, kind messages|recipients, period "
                             "minute|hour|day, count at least 1")
        scope, kind, count, period = match.groups()
        limits.append(Limit(cast(Scope, scope), cast(Kind, kind), int(count), period))
    return limits


def subjects(client: str, sender: str, user: str) -> list[tuple[Scope, str]]:
    """Who one request is counted against. The null sender (bounces) has no sender limit:
    a host's bounces are counted against the host."""
    found: list[tuple[Scope, str]] = [("client", client)]
    if sender:
        found.append(("sender", sender.lower()))
    if user:
        found.append(("user", user.lower()))
    return found


def subject_text(scope: str, value: str) -> str:
    return f"{scope}:{value}"


@dataclass(frozen=True)
class Bucket:
    """One counter a request moves: `key` in the store, one unit every `interval` seconds
    refills, at most `period` seconds' worth (the limit's count) at once."""

    key: str
    interval: float
    period: int
    limit: Limit
    subject: str


def buckets(limits: list[Limit], found: list[tuple[Scope, str]], new_message: bool,
            attempts: bool = False, factor: float = 1.0) -> list[Bucket]:
    """The counters one recipient of one transaction moves: every recipients limit of its
    subjects, and the messages limits at the transaction's first counted recipient.
    `attempts`: the shadow buckets that count tries, accepted or not, against `factor`
    times each limit (the hold)."""
    chosen = []
    for scope, value in found:
        for limit in limits:
            if limit.scope != scope or (limit.kind == "messages" and not new_message):
                continue
            if attempts and limit.period == "minute":
                continue  # a queue run retrying a backlog is a burst of tries, not a spammer
            count = limit.count * factor if attempts else limit.count
            prefix = "a" if attempts else "l"
            chosen.append(Bucket(f"{prefix}:{limit.text}:{value}", limit.seconds / count,
                                 limit.seconds, limit, subject_text(scope, value)))
    return chosen


def gcra(tat: float | None, now: float, interval: float, period: float) -> tuple[bool, float]:
    """One unit into a bucket whose theoretical arrival time is `tat` (None: empty): whether
    it fits, and the bucket's new time (unchanged when it does not fit). The Redis script
    does the same in Lua."""
    start = now if tat is None or tat < now else tat
    new = start + interval
    if new - now > period + 1e-9:
        return False, start
    return True, new


def refusal(limit: Limit, subject: str) -> str:
    """The answer past a limit: 450, the limit named (the sender's MTA keeps the mail)."""
    return (f"450 4.7.1 Outbound limit reached: {limit.count} {limit.kind} per {limit.period}"
            f" for {subject}, please retry later")


def held_refusal(subject: str) -> str:
    return (f"450 4.7.1 Outbound mail held for {subject} (far over its limits): ask the "
            "postmaster to release it")


@dataclass(frozen=True)
class Held:
    subject: str  # scope:value
    since: float
    reason: str  # the limit whose tries overflowed
    notified: bool = False

    @property
    def scope(self) -> str:
        return self.subject.partition(":")[0]

    @property
    def value(self) -> str:
        return self.subject.partition(":")[2]


@dataclass(frozen=True)
class Charged:
    """What counting one recipient found: a held subject, the first limit it would pass
    (nothing was counted then), and the subjects whose tries overflowed `factor` times a
    limit (to hold now)."""

    held: str | None
    over: Bucket | None
    overflowed: list[Bucket]


def hold_reason(bucket: Bucket, factor: float) -> str:
    return f"over {factor:g} times {bucket.limit.text}"
