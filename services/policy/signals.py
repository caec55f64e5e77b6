"""Selective greylisting: greylist only the clients that look like spam bots.

Greylisting's cost is its delay: a login code or a password reset from a large sender
arrives after it expired. So the policy service scores what it knows of the client at RCPT
time, and greylists (postgrey's semantics, greylist.py) only at or above a threshold, as
bley and Rspamd do. Each signal has a weight (SECUMAIL_GREYLIST_SIGNALS, names and defaults
in secumail/settings.py; 0 turns it off; negative ones speak for the client):

    no-rdns            the client's address has no PTR name (Postfix: reverse_client_name)
    rdns-mismatch      it has one, which does not resolve back to it (no FCrDNS)
    dynamic-rdns       its name looks like a home connection's: the address inside it, or
                       dyn, pool, dsl, dhcp, cable, ppp, dialup, broadband...
    helo-ip            the HELO is an address, not a name
    helo-unresolved    the HELO name does not resolve
    dnsbl              DNSBL zones list it, below the reject threshold (their weights count)
    dnswl              a DNS whitelist lists it (SECUMAIL_GREYLIST_DNSWL_ZONES, weights there)
    spf-pass           SPF passed for the sender's domain
    known-sender       the sender's domain is one of SECUMAIL_GREYLIST_KNOWN_SENDERS (and SPF,
                       when checked, passed: a forged sender buys no pass)
    passed-before      the client's network got through greylisting before

Plain functions of what the engine gathered (Postfix's names, the SPF result, the DNS
answers): no I/O here.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from secumail.netaddr import IPAddress, parse_ip

_DYNAMIC = re.compile(
    r"(^|[.-])(dyn|dynamic|dynip|pool|dsl|adsl|vdsl|xdsl|dhcp|cable|ppp|pppoe|dialup|"
    r"dial-up|dial|broadband|residential|cpe)\d*([.-]|$)")


def looks_dynamic(name: str, address: IPAddress) -> bool:
    """A PTR name that a home or mobile connection would have: its address written in it
    (in order or reversed, any separators), or a word such pools use."""
    name = name.lower().rstrip(".")
    if address.version == 4:
        octets = str(address).split(".")
        digits = "." + _NOT_DIGITS.sub(".", name).strip(".") + "."
        if f".{'.'.join(octets)}." in digits or f".{'.'.join(reversed(octets))}." in digits:
            return True
        if address.packed.hex() in name:  # c0a80001.pool.example
            return True
    return bool(_DYNAMIC.search(name))


_NOT_DIGITS = re.compile(r"[^0-9]+")
_ADDRESS_ENDS = tuple("0123456789]")


def is_address_literal(helo: str) -> bool:
    """`[192.0.2.1]`, `192.0.2.1`, `[IPv6:2001:db8::1]`: a HELO that names no host."""
    text = helo.strip()
    if ":" not in text and not text.endswith(_ADDRESS_ENDS):
        return False  # mx.example.net: not worth parsing (a failed parse costs microseconds)
    text = text.removeprefix("[").removesuffix("]").lower().removeprefix("ipv6:")
    return parse_ip(text) is not None


class ClientFacts(NamedTuple):
    """What is known of the client at RCPT time (a tuple: made for nearly every request,
    and a frozen dataclass takes several times as long to make)."""

    address: IPAddress
    reverse_name: str  # Postfix's reverse_client_name: the PTR name, or "unknown"
    verified_name: str  # Postfix's client_name: the PTR name if it resolves back, or "unknown"
    helo: str
    helo_resolves: bool | None  # None: not asked (a literal, or the signal is off)
    dnsbl_score: float  # the listing zones' weights (below the reject threshold)
    dnswl_score: float  # the listing whitelist zones' weights (negative: they vouch)
    spf_result: str  # "" when SPF is not checked
    sender_domain: str
    known_senders: frozenset[str]
    passed_before: bool


def _known(domain: str, known: frozenset[str]) -> bool:
    return domain in known or domain.endswith(_subdomain_suffixes(known))


@functools.lru_cache(maxsize=8)
def _subdomain_suffixes(known: frozenset[str]) -> tuple[str, ...]:
    return tuple("." + k for k in known)


def signals(facts: ClientFacts, weights: dict[str, float]) -> list[tuple[str, float]]:
    """The signals that apply to this client, with their weights (zero weights left out)."""
    found: list[tuple[str, float]] = []
    reverse = facts.reverse_name.lower()
    has_ptr = reverse not in ("", "unknown")
    checks = {
        "no-rdns": (not has_ptr, 1.0),
        "rdns-mismatch": (has_ptr and facts.verified_name.lower() in ("", "unknown"), 1.0),
        "dynamic-rdns": (has_ptr and looks_dynamic(reverse, facts.address), 1.0),
        "helo-ip": (is_address_literal(facts.helo), 1.0),
        "helo-unresolved": (facts.helo_resolves is False, 1.0),
        # The zones' own weights, scaled by the signal's weight.
        "dnsbl": (facts.dnsbl_score > 0, facts.dnsbl_score),
        "dnswl": (facts.dnswl_score != 0, facts.dnswl_score),
        "spf-pass": (facts.spf_result == "pass", 1.0),
        # A forged sender must not buy a pass: when SPF is checked, it must pass too.
        "known-sender": (bool(facts.sender_domain) and facts.spf_result in ("", "pass")
                         and _known(facts.sender_domain, facts.known_senders), 1.0),
        "passed-before": (facts.passed_before, 1.0),
    }
    for name, (applies, scale) in checks.items():
        weight = weights.get(name, 0.0) * scale
        if applies and weight:
            found.append((name, weight))
    return found


def score(found: list[tuple[str, float]]) -> float:
    return round(sum(weight for _, weight in found), 3)


def describe(found: list[tuple[str, float]]) -> str:
    """`score 3 (no-rdns +2, helo-unresolved +1)`, for the log, the header and the reason."""
    parts = ", ".join(f"{name} {weight:+g}" for name, weight in found) or "no signal"
    return f"score {score(found):g} ({parts})"
