"""Greylisting decisions, with postgrey's semantics, as plain functions of state and time.

The triplet is (client network, sender, recipient): /24 for IPv4 and /64 for IPv6, so a
sender retrying from a neighbouring address of the same farm is recognised. Storage is
someone else's job (stores.py); nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Literal

from secumail.netaddr import IPAddress, Network, parse_network


@dataclass(frozen=True)
class GreylistConfig:
    delay: int = 300
    retry_window: int = 2 * 86400
    max_age: int = 35 * 86400
    auto_whitelist: int = 5


@dataclass(frozen=True)
class Triplet:
    """What the store remembers about one (network, sender, recipient)."""

    first_seen: float
    last_seen: float
    passed: bool = False


@dataclass(frozen=True)
class ClientRecord:
    """How many triplets a client network has got through greylisting (auto-whitelist)."""

    passes: int
    last_seen: float


@dataclass(frozen=True)
class GreyVerdict:
    defer: bool
    entry: Triplet
    # Seconds the message was held back, set once: when the triplet first passes.
    delayed: float | None = None
    # Seconds left before a retry can pass, when deferred.
    retry_in: float = 0.0


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store's key of a triplet: `network/sender/recipient`, `network` the client's
    from `client_network()`. (A string, built on every request: TripletKey reads it back.)"""
    return f"{network}/{(sender or '<>').lower()}/{recipient.lower()}"


@dataclass(frozen=True)
class TripletKey:
    network: str
    sender: str  # "<>" for the null sender
    recipient: str

    @classmethod
    def from_text(cls, key: str) -> TripletKey:
        """The parts of `triplet_key()`'s text; the network itself holds a slash."""
        address, _, prefix_rest = key.partition("/")
        prefix, _, rest = prefix_rest.partition("/")
        sender, _, recipient = rest.rpartition("/")
        return cls(f"{address}/{prefix}", sender, recipient)

    @property
    def text(self) -> str:
        return triplet_key(self.network, self.sender, self.recipient)


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


# postgrey counts a client's passes at most once an hour ("record only one attempt per hour"):
# one session with many recipients, or a burst of retries, is one pass, not a whitelisting.
AWL_COUNT_INTERVAL = 3600


def record_pass(record: ClientRecord | None, now: float, max_age: float) -> ClientRecord | None:
    """The client network's record once one more of its triplets got through, or None when
    this pass does not count (its last counted pass was less than an hour ago). A record
    older than `max_age` starts over. Kept counting once whitelisted, to keep it fresh."""
    if record is None or now - record.last_seen > max_age:
        return ClientRecord(1, now)
    if abs(now - record.last_seen) < AWL_COUNT_INTERVAL:  # either way: replicas' clocks differ
        return None
    return ClientRecord(record.passes + 1, now)


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


# --- whitelist entries added at run time (the gateway's admin API) ---------------------------

WhitelistKind = Literal["client", "recipient"]
_LABELS = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]"
                     r"([a-z0-9_-]{0,61}[a-z0-9])?)*$")
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


@dataclass(frozen=True)
class WhitelistEntry:
    kind: WhitelistKind
    value: str
    added: float


def normalize_whitelist_entry(kind: WhitelistKind, value: str) -> str:
    """The canonical text of a whitelist entry, in the forms the settings' whitelists take;
    ValueError naming the entry otherwise."""
    value = value.strip().lower()
    if kind == "client":
        try:
            return str(parse_network(value))
        except ValueError:
            name = value.rstrip(".").removeprefix("*.")
            if _LABELS.match(name):
                return name
        raise ValueError(f"not an IP address, network, host or domain name: {value!r}")
    local, at, domain = value.rpartition("@")
    domain = domain.rstrip(".")
    if at and not domain and _LOCAL.match(local):
        return value  # `postmaster@`: that local part in every domain
    if at and _LOCAL.match(local) and _LABELS.match(domain) and "." in domain:
        return f"{local}@{domain}"
    if not at and _LABELS.match(domain) and "." in domain:
        return domain
    raise ValueError(f"not an address, `local@` or a domain: {value!r}")


def split_whitelists(
    entries: list[WhitelistEntry],
) -> tuple[ClientWhitelist, RecipientWhitelist]:
    clients = [e.value for e in entries if e.kind == "client"]
    return ClientWhitelist(clients), RecipientWhitelist(
        [e.value for e in entries if e.kind == "recipient"]
    )
