"""Greylisting decisions, with postgrey's semantics, as plain functions of state and time.

The triplet is (client network, sender, recipient): /24 for IPv4 and /64 for IPv6, so a
sender retrying from a neighbouring address of the same farm is recognised. Storage, and
what it holds (triplets, client records, whitelist entries), is the shared core's
(secumail/greylist_store.py, which the gateway's admin API uses too); nothing here does
I/O or reads the clock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from email.utils import formatdate

from secumail.greylist_store import MAX_AGE, RETRY_WINDOW, ClientRecord, Triplet, WhitelistEntry
from secumail.netaddr import IPAddress, Network, parse_network


@dataclass(frozen=True)
class GreylistConfig:
    delay: int = 300
    retry_window: int = RETRY_WINDOW
    max_age: int = MAX_AGE
    auto_whitelist: int = 5


@dataclass(frozen=True)
class GreyVerdict:
    defer: bool
    entry: Triplet
    # Seconds the message was held back, set once: when the triplet first passes.
    delayed: float | None = None
    # Seconds left before a retry can pass, when deferred.
    retry_in: float = 0.0


def check_triplet(entry: Triplet | None, now: float, cfg: GreylistConfig) -> GreyVerdict:
    """Decide for one delivery attempt and return the entry to store."""
    if entry is None or now - entry.last_seen > cfg.max_age:
        return GreyVerdict(True, Triplet(now, now), retry_in=cfg.delay)
    if entry.passed:
        return GreyVerdict(False, replace(entry, last_seen=now))
    waited = now - entry.first_seen
    if waited > cfg.retry_window:
        # The retry came too late to count: start over, as postgrey does.
        return GreyVerdict(True, Triplet(now, now), retry_in=cfg.delay)
    if waited < cfg.delay:
        return GreyVerdict(True, replace(entry, last_seen=now), retry_in=cfg.delay - waited)
    return GreyVerdict(False, Triplet(entry.first_seen, now, passed=True), delayed=waited)


def client_is_whitelisted(record: ClientRecord | None, now: float, cfg: GreylistConfig) -> bool:
    """A client network that passed greylisting often enough is trusted (auto-whitelist)."""
    if record is None or cfg.auto_whitelist <= 0:
        return False
    return record.passes >= cfg.auto_whitelist and now - record.last_seen <= cfg.max_age


def greylist_header(delayed: float | None, hostname: str, now: float, why: str = "") -> str:
    """The X-Greylist header, worded as postgrey's so that users recognise it. `delayed`
    None: selective greylisting let the client through at once; `why`: its score."""
    what = "not delayed" if delayed is None else f"delayed {int(delayed)} seconds"
    because = f", {why}" if why else ""
    return f"X-Greylist: {what} by SecuMail at {hostname}{because}; {_date(int(now))}"


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322's date of this second: worked out once a second, not once a request."""
    return formatdate(second, usegmt=True)


class ClientWhitelist:
    """Clients never greylisted: IP addresses, networks, host names or whole domains."""

    def __init__(self, entries: list[str]) -> None:
        self.networks: list[Network] = []
        self.names: list[str] = []
        for entry in entries:
            try:
                self.networks.append(parse_network(entry))
            except ValueError:
                self.names.append(entry.lower().strip(".").removeprefix("*."))

    def matches(self, ip: IPAddress, client_name: str) -> bool:
        if any(ip in net for net in self.networks):
            return True
        name = client_name.lower().rstrip(".")
        if not name or name == "unknown":
            return False
        return any(name == n or name.endswith("." + n) for n in self.names)


class RecipientWhitelist:
    """Recipients never greylisted: `user@domain`, `postmaster@` (any domain) or `domain`."""

    def __init__(self, entries: list[str]) -> None:
        self.addresses = {e.lower() for e in entries if "@" in e and not e.endswith("@")}
        self.local_parts = {e.lower()[:-1] for e in entries if e.endswith("@")}
        self.domains = {e.lower().strip(".") for e in entries if "@" not in e}

    def matches(self, recipient: str) -> bool:
        address = recipient.lower()
        local, _, domain = address.rpartition("@")
        return (
            address in self.addresses
            or local in self.local_parts
            or any(domain == d or domain.endswith("." + d) for d in self.domains)
        )


def split_whitelists(
    entries: list[WhitelistEntry],
) -> tuple[ClientWhitelist, RecipientWhitelist]:
    clients = [e.value for e in entries if e.kind == "client"]
    return ClientWhitelist(clients), RecipientWhitelist(
        [e.value for e in entries if e.kind == "recipient"]
    )
