"""SPF (RFC 7208) through pyspf, with every lookup sent to the shared resolver.

Two services check SPF: the policy service (to refuse a forged sender at RCPT time and add
Received-SPF) and the DKIM milter (the result DMARC uses, computed by this host for this
transaction rather than read from a header the client could have written).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver
import spf as pyspf

from secumail.dns import TtlCache

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


class SpfLookups:
    """pyspf's lookups, asked of `resolver` and kept for their TTL. dnspython's own cache
    takes about 30 us of CPU a hit (it builds names and a resolution first), on every SPF
    check; this takes one. Shared by the checks' threads (hence the lock)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver
        self._answers: TtlCache[tuple[str, str], list[Any]] = TtlCache(10000)
        self._lock = threading.Lock()

    def lookup(self, name: str, qtype: str, timeout: float) -> list[Any]:
        kept = self.kept(name, qtype)
        if kept is not None:
            return kept
        results, ttl = _pyspf_lookup(self.resolver, name, qtype, timeout)
        if ttl > 0:
            with self._lock:
                self._answers.put((name.lower(), qtype), results, ttl)
        return list(results)

    def kept(self, name: str, qtype: str) -> list[Any] | None:
        with self._lock:
            kept = self._answers.get((name.lower(), qtype))
        return None if kept is None else list(kept)


class _NotKept(pyspf.TempError):  # type: ignore[misc]
    """A lookup the kept answers cannot answer (a TempError: pyspf ends the check)."""


class _KeptOnly:
    """pyspf's lookups answered from the kept answers alone, on the event loop: a check
    whose every answer is kept needs no thread. A miss ends the check, and is remembered:
    pyspf swallows some lookup errors (exp=, ptr), whose results must not be believed."""

    def __init__(self, lookups: SpfLookups) -> None:
        self.lookups = lookups
        self.missed = False

    def lookup(self, name: str, qtype: str, timeout: float) -> list[Any]:
        kept = self.lookups.kept(name, qtype)
        if kept is None:
            self.missed = True
            raise _NotKept(f"{name} {qtype} not kept")
        return kept


def _pyspf_lookup(resolver: dns.resolver.Resolver, name: str, qtype: str,
                  timeout: float) -> tuple[list[Any], float]:
    """One lookup as pyspf's DNSLookup answers it, asked of `resolver`, and how long the
    answer may be kept (0: not at all; an NXDOMAIN for as long as its zone's SOA says)."""
    results: list[Any] = []
    try:
        answer = resolver.resolve(name, qtype, lifetime=timeout, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as error:
        return results, _negative_ttl(error)
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
    expiration = getattr(answer, "expiration", None)  # the tests' fake answers have none
    return results, (expiration - time.time()) if expiration is not None else 0.0


def _negative_ttl(error: dns.resolver.NXDOMAIN) -> float:
    """How long an NXDOMAIN may be kept: its zone's SOA says (RFC 2308); none, not kept."""
    try:
        responses = error.responses()  # type: ignore[no-untyped-call]
    except KeyError:  # raised without the responses (the tests' fake resolver)
        return 0.0
    for response in responses.values():
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


# pyspf resolves through one module-level hook. It is set once, here, to ask the lookups
# of the check running in this thread (check_spf sets them): two checkers never share one.
_check = threading.local()


def _lookup_for_this_check(name: str, qtype: str, strict: bool = True,
                           timeout: float = 20) -> list[Any]:
    lookups: SpfLookups | _KeptOnly | None = getattr(_check, "lookups", None)
    if lookups is None:
        raise pyspf.TempError("SPF lookup outside check_spf")
    return lookups.lookup(name, qtype, timeout)


pyspf.DNSLookup = _lookup_for_this_check


def check_spf(
    client_address: str, sender: str, helo: str, receiver: str, timeout: float,
    lookups: SpfLookups | _KeptOnly,
) -> SpfOutcome:
    """Blocking with SpfLookups (run it in a thread); on the event loop with _KeptOnly, which
    never blocks. An empty sender checks the HELO identity (RFC 7208 2.4). Every lookup
    goes to `lookups`."""
    query = pyspf.query(i=client_address, s=sender, h=helo, receiver=receiver, querytime=timeout)
    _check.lookups = lookups
    try:
        result, _code, explanation = query.check()
    finally:
        _check.lookups = None
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
    """`check_spf` for the event loop: from the kept answers on the loop itself when they
    answer every lookup (most checks: a sender domain's record is asked for again and
    again; a thread costs several times pyspf's own 30 us, most of it in handing the
    interpreter lock back and forth), else in a thread pool, where pyspf may block on DNS."""

    def __init__(self, resolver: dns.resolver.Resolver, receiver: str, timeout: float,
                 threads: int = 16) -> None:
        self.lookups = SpfLookups(resolver)
        self.receiver = receiver
        self.timeout = timeout  # for the whole check, all its lookups together
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spf")

    async def check(self, client_address: str, sender: str, helo: str) -> SpfOutcome:
        kept_only = _KeptOnly(self.lookups)
        outcome = check_spf(client_address, sender, helo, self.receiver, self.timeout, kept_only)
        if not kept_only.missed:
            return outcome
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, check_spf, client_address, sender, helo, self.receiver, self.timeout,
            self.lookups)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
