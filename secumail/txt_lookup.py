"""TXT lookups for DKIM keys and DMARC records, through the shared resolver (secumail.dns).

Three outcomes: the record strings, None (no such name or no TXT: a permanent answer), or
DnsTemporaryError (timeout, SERVFAIL, no server reachable), which the milter reports as
temperror and defers or accepts as SECUMAIL_DKIM_FAIL_OPEN says.
"""

from __future__ import annotations

from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.resolver

from secumail.dmarc import TxtLookup
from secumail.dns import DnsTemporaryError

_PERMANENT = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)
_TEMPORARY = (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout)


def _strings(answer: dns.resolver.Answer) -> list[str]:
    # A TXT record is several character-strings; DKIM and DMARC join them (RFC 6376 3.6.2.2).
    return [b"".join(rdata.strings).decode("latin-1") for rdata in answer]


def async_txt_lookup(resolver: dns.asyncresolver.Resolver) -> TxtLookup:
    async def lookup(name: str) -> list[str] | None:
        try:
            answer = await resolver.resolve(name, "TXT")
        except _PERMANENT:
            return None
        except _TEMPORARY as error:
            raise DnsTemporaryError(f"{name}: {type(error).__name__}") from None
        except dns.exception.DNSException as error:
            raise DnsTemporaryError(f"{name}: {error}") from None
        return _strings(answer)

    return lookup


def dkimpy_dnsfunc(resolver: dns.resolver.Resolver) -> Callable[..., bytes | None]:
    """A `dnsfunc` for dkimpy (dkim.verify) backed by the shared resolver, so that plain
    dkimpy asks the same servers (used by the benchmark and the interoperability tests)."""

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=timeout)
        except _PERMANENT:
            return None
        except dns.exception.DNSException as error:
            import dkim

            raise dkim.DnsTimeoutError(str(error)) from None
        strings = _strings(answer)
        return strings[0].encode("latin-1") if strings else None

    return get_txt
