"""Your own domain in the header From of mail from outside (CEO fraud): plain functions.

Postfix refuses `MAIL FROM:<ceo@example.org>` from outside (the envelope); what a user sees
is the header From. Mail from a client neither in SECUMAIL_MYNETWORKS nor authenticated
whose From domain is one of SECUMAIL_DOMAINS (or a subdomain) is refused, whatever that
domain's DMARC record says (none, p=none, or p=reject with SECUMAIL_DMARC_REJECT off),
unless:
- a DKIM signature made with one of our own keys, aligned with that domain, verified (our
  own mail coming back through a forwarder or a list that changed nothing), or
- its envelope sender or client is one SECUMAIL_OWN_DOMAIN_ALLOWED lists (a newsletter
  service sending as us).
A display name that shows an address of ours on mail from elsewhere (`"ceo@example.org"
<x@evil.example>`) is not refused (a person may write anything there) but tagged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from secumail.dmarc import aligned
from secumail.netaddr import IPAddress, Network
from services.dkim.auth_results import DkimReport

WARNING_HEADER = "X-SecuMail-Warning"
_ANGLE_ADDRESS = re.compile(r"<\s*([^<>\s]+@[^<>\s]+?)\s*>")
_ADDRESS_IN_TEXT = re.compile(r"[^\s<>\"'(),;:@]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def ours(domain: str, domains: Iterable[str]) -> bool:
    """Whether `domain` is one of ours or a subdomain of one."""
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


@dataclass(frozen=True)
class AllowedOutsiders:
    """Who may send as our domains from outside: envelope senders (an address, or a domain
    and its subdomains) and client networks."""

    senders: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def from_lists(cls, senders: Iterable[str], networks: Iterable[Network]) -> AllowedOutsiders:
        """`senders`: addresses, or domains (`@example.net` or `example.net`)."""
        items = [item.strip().lower() for item in senders if item.strip()]
        return cls(frozenset(i for i in items if "@" in i.lstrip("@")),
                   tuple(i.lstrip("@") for i in items if "@" not in i.lstrip("@")),
                   tuple(networks))

    def allow(self, sender: str, client: IPAddress | None) -> bool:
        sender = sender.lower()
        if sender and (sender in self.senders or ours(sender.rpartition("@")[2],
                                                      self.domains)):
            return True
        return client is not None and any(client in net for net in self.networks)


def signed_by_us(from_domain: str, reports: Iterable[DkimReport],
                 our_keys: set[tuple[str, str]]) -> bool:
    """Whether a verified signature aligned with `from_domain` was made with one of our
    keys, named by (domain, selector): DNS publishes our public key under that name, so a
    pass is proof our private key signed."""
    return any(r.result == "pass" and aligned(r.domain, from_domain, strict=False)
               and (r.domain.lower(), r.selector.lower()) in our_keys for r in reports)


def forgery(from_domain: str, domains: Iterable[str], reports: Iterable[DkimReport],
            our_keys: set[tuple[str, str]], allowed: AllowedOutsiders, sender: str,
            client: IPAddress | None) -> str | None:
    """Why mail from outside with this From domain is refused, or None when it may pass."""
    if not ours(from_domain, domains) or signed_by_us(from_domain, reports, our_keys):
        return None
    if allowed.allow(sender, client):
        return None
    return f"From {from_domain}: your own domain from outside, not signed with its key"


def display_name_claim(from_values: Iterable[str], domains: Iterable[str]) -> str | None:
    """An address of ours shown in a From's display name (quoted or not) when the address
    the mail is really from (the one in angle brackets) is elsewhere."""
    domains = list(domains)
    for value in from_values:
        angle = _ANGLE_ADDRESS.findall(value)
        if angle:
            address, shown = angle[-1], _ANGLE_ADDRESS.sub(" ", value)
        else:  # `x@evil.example (ceo@example.org)`: the first address, then a comment
            first = _ADDRESS_IN_TEXT.search(value)
            if first is None:
                continue
            address, shown = first.group(0), value[first.end():]
        if ours(address.rpartition("@")[2], domains):
            continue  # the address itself is ours: the forgery check judges it
        for found in _ADDRESS_IN_TEXT.finditer(shown):
            if ours(found.group(1), domains):
                return found.group(0)[:200]
    return None


def warning(claimed: str, address_domain: str) -> str:
    return (f"the sender's name shows {claimed}, an address of this site, but the mail "
            f"comes from {address_domain} outside it")
