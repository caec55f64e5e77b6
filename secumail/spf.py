"""SPF (RFC 7208) through pyspf, with every lookup sent to the shared resolver.

Two services check SPF: the policy service (to refuse a forged sender at RCPT time and add
Received-SPF) and the DKIM milter (the result DMARC uses, computed by this host for this
transaction rather than read from a header the client could have written).
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import spf as pyspf

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


@dataclass(frozen=True)
class SpfOutcome:
    result: str  # one of SPF_RESULTS
    explanation: str
    header: str  # Received-SPF value, result keyword first (RFC 7208 section 9.1)


def clean_text(text: str, limit: int = 200) -> str:
    """Text from DNS (exp=) goes into SMTP replies and headers: printable ASCII, bounded."""
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


def spf_action(outcome: SpfOutcome, reject_fail: bool) -> str | None:
    """The policy action for an SPF result, or None to go on with the next check."""
    if outcome.result == "fail" and reject_fail:
        return f"550 5.7.23 SPF check failed: {outcome.explanation or 'sender not authorized'}"
    if outcome.result == "temperror":
        return "451 4.7.24 SPF temporary error, please retry later"
    return None


def _pyspf_lookup(resolver: dns.resolver.Resolver, name: str, qtype: str,
                  timeout: float) -> list[Any]:
    """One lookup as pyspf's DNSLookup answers it, asked of `resolver`."""
    results: list[Any] = []
    try:
        answer = resolver.resolve(name, qtype, lifetime=timeout, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return results
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
        raise pyspf.TempError(f"DNS {error}") from None
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            results.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            results.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            results.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            results.append(((name, qtype), rdata.strings))
    return results


# pyspf resolves through one module-level hook. It is set once, here, to ask the resolver
# of the check running in this thread (check_spf sets it): two checkers never share one.
_check = threading.local()


def _lookup_for_this_check(name: str, qtype: str, strict: bool = True,
                           timeout: float = 20) -> list[Any]:
    resolver = getattr(_check, "resolver", None)
    if resolver is None:
        raise pyspf.TempError("SPF lookup outside check_spf")
    return _pyspf_lookup(resolver, name, qtype, timeout)


pyspf.DNSLookup = _lookup_for_this_check


def check_spf(
    client_address: str, sender: str, helo: str, receiver: str, timeout: float,
    resolver: dns.resolver.Resolver,
) -> SpfOutcome:
    """Blocking: run it in a thread. An empty sender checks the HELO identity (RFC 7208 2.4).
    Every lookup goes to `resolver`."""
    query = pyspf.query(i=client_address, s=sender, h=helo, receiver=receiver, querytime=timeout)
    _check.resolver = resolver
    try:
        result, _code, explanation = query.check()
    finally:
        _check.resolver = None
    if result not in SPF_RESULTS:
        result = "permerror"
    if explanation == pyspf.EXPLANATIONS.get(result):
        # pyspf's stock text says little; the header comment names the domain and the address.
        explanation = query.get_header_comment(result)
    header = query.get_header(result, receiver=receiver)
    # pyspf capitalises the keyword ("Pass (...)"); RFC 7208 writes it in lower case.
    header = result + header[header.index(" ") :] if " " in header else result
    return SpfOutcome(result, clean_text(explanation), clean_text(header, 900))


class SpfChecker:
    """`check_spf` off the event loop: pyspf blocks on DNS, so it runs in a thread pool."""

    def __init__(self, resolver: dns.resolver.Resolver, receiver: str, timeout: float,
                 threads: int = 16) -> None:
        self.resolver = resolver
        self.receiver = receiver
        self.timeout = timeout  # for the whole check, all its lookups together
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spf")

    async def check(self, client_address: str, sender: str, helo: str) -> SpfOutcome:
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, check_spf, client_address, sender, helo, self.receiver, self.timeout,
            self.resolver)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
