"""The one DNS resolver factory: SPF, DKIM and DNSBL code all resolve through it.

`SECUMAIL_DNS_SERVERS` (comma list of host[:port]) points every lookup at chosen servers;
tests use it to aim at a DNS server they start themselves, so no lookup leaves the machine.
Empty means the system resolver (/etc/resolv.conf).
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from secumail.netaddr import HostPort


class DnsTemporaryError(Exception):
    """The DNS did not answer (timeout, SERVFAIL, no server reachable): a lookup that may
    succeed later (DKIM and DMARC then report temperror)."""


def _configure(
    resolver: dns.resolver.BaseResolver, servers: list[HostPort], timeout: float
) -> None:
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers]
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)


def make_resolver(servers: list[HostPort], timeout: float) -> dns.resolver.Resolver:
    """A blocking resolver, for libraries that resolve synchronously (pyspf, dkimpy)."""
    resolver = dns.resolver.Resolver(configure=not servers)
    _configure(resolver, servers, timeout)
    resolver.cache = dns.resolver.LRUCache(10000)
    return resolver


def make_async_resolver(servers: list[HostPort], timeout: float) -> dns.asyncresolver.Resolver:
    """An asyncio resolver, for lookups made from the event loop (DNSBL)."""
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    _configure(resolver, servers, timeout)
    resolver.cache = dns.resolver.LRUCache(10000)
    return resolver


async def name_resolves(resolver: dns.asyncresolver.Resolver, name: str) -> bool:
    """Whether `name` has an A or AAAA record. A name DNS cannot even carry (bad syntax, a
    single label) does not resolve; a DNS failure raises (the caller fails open or closed)."""
    name = name.strip().rstrip(".")
    if "." not in name:
        return False
    try:
        query = dns.name.from_text(name)
    except dns.exception.DNSException:
        return False
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(query, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return False
        if len(answer):
            return True
    return False
