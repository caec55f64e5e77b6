"""DMARC (RFC 7489) evaluation of the From domain: plain functions of the record and results.

The record lookup is the caller's (through the shared resolver); here: parse the record,
find the organizational domain (Public Suffix List, shipped with `publicsuffixlist`, read
from the package, never downloaded), check SPF and DKIM alignment, apply the policy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList

_PSL = PublicSuffixList()
_POLICIES = ("none", "quarantine", "reject")
_SIMPLE_ADDRESS = re.compile(r"^[^\"(),:;<>@\[\\\]\s]+@([A-Za-z0-9.-]+)$")
_ANGLE_ADDRESS = re.compile(r"^[^\"(),:;<>@\[\\\]]*<[^\"(),:;<>@\[\\\]\s]+@([A-Za-z0-9.-]+)>$")


def organizational_domain(domain: str) -> str:
    """example.co.uk for mail.example.co.uk; the domain itself when it is a public suffix."""
    domain = domain.lower().rstrip(".")
    return _PSL.privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, strict: bool) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if strict:
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def from_domains(from_values: list[str]) -> list[str]:
    """The domains of every address in the From headers (RFC 5322.From), lowercased."""
    domains = []
    for value in from_values:
        text = value.strip()
        # The common shapes without the email package's full parser (10x cheaper).
        match = _SIMPLE_ADDRESS.match(text) or _ANGLE_ADDRESS.match(text)
        if match:
            domains.append(match.group(1).lower().rstrip("."))
            continue
        for _, address in getaddresses([text]):
            if "@" in address:
                domains.append(address.rpartition("@")[2].lower().rstrip(".").rstrip(">"))
    return domains


class AuthorError(ValueError):
    """A message without exactly one author domain: DMARC cannot say who sent it."""


def author_domain(from_values: list[str]) -> str:
    """The one RFC5322.From domain that DMARC evaluates. RFC 7489 6.6.1 leaves messages with
    none or several to the receiver; SecuMail refuses them (AuthorError says why), as large
    receivers do: a second From field would let a replayed signed message name another
    author, and several domains would let the weakest policy decide."""
    if len(from_values) != 1:
        raise AuthorError(f"{len(from_values)} From header fields, where RFC 5322 wants one")
    domains = set(from_domains(from_values))
    if not domains:
        raise AuthorError("no address in the From header")
    if len(domains) > 1:
        raise AuthorError("the From header names several domains")
    return domains.pop()


@dataclass(frozen=True)
class DmarcRecord:
    policy: str
    subdomain_policy: str
    strict_dkim: bool
    strict_spf: bool
    percent: int
    rua: tuple[str, ...] = ()  # where aggregate reports go: URIs, mailto: ones used


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record, or None when `text` is not one (RFC 7489 6.6.3: then ignore it)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    if not text.lstrip().startswith("v=DMARC1") or tags.get("v") != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        # 6.6.3: a record with a bad or missing p= counts as p=none when rua= is usable
        # (and is ignored otherwise: as p=none, it changes nothing here).
        policy = "none"
    subdomain_policy = tags.get("sp", "").lower()
    if subdomain_policy not in _POLICIES:
        subdomain_policy = policy
    try:
        percent = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        percent = 100
    rua = tuple(uri.strip() for uri in tags.get("rua", "").split(",") if uri.strip())
    return DmarcRecord(policy, subdomain_policy, tags.get("adkim", "r").lower() == "s",
                       tags.get("aspf", "r").lower() == "s", percent, rua)


@dataclass(frozen=True)
class DmarcOutcome:
    result: str  # pass, fail, none, temperror, permerror
    domain: str = ""  # the From domain
    policy: str = ""  # the policy that applies (p= or sp=), when a record was found
    disposition: str = "none"  # what the policy asks for this message, after pct=
    reason: str = ""
    # Who spoke for a failing message: a trusted ARC sealer that saw it pass (RFC 8617
    # 7.2.1, a local policy override); the disposition is then none.
    arc_override: str = ""
    # What the pass or fail rests on (an aggregate report's policy_evaluated says both).
    dkim_aligned: bool = False
    spf_aligned: bool = False


TxtLookup = Callable[[str], Awaitable[list[str] | None]]


async def find_record(from_domain: str, lookup: TxtLookup) -> tuple[DmarcRecord | None, bool]:
    """The record that governs `from_domain` and whether it came from the organizational
    domain (then sp= applies). `lookup` returns the TXT strings, None for no such name, and
    raises DnsTemporaryError."""
    organizational = organizational_domain(from_domain)
    for domain in dict.fromkeys((from_domain, organizational)):
        texts = await lookup(f"_dmarc.{domain}")
        records = [r for r in (parse_record(t) for t in texts or []) if r is not None]
        if len(records) == 1:
            return records[0], domain != from_domain
        # 6.6.3: several records are as none; go on to the organizational domain.
    return None, False


def evaluate(
    from_domain: str, record: DmarcRecord | None, from_organizational: bool,
    dkim_pass_domains: list[str], spf_result: str, spf_domain: str,
    sample: Callable[[], float] = random.random,
) -> DmarcOutcome:
    """Pass when an aligned DKIM signature or an aligned SPF pass exists (RFC 7489 4.2)."""
    if record is None:
        return DmarcOutcome("none", from_domain, reason="no DMARC record")
    policy = record.subdomain_policy if from_organizational else record.policy
    dkim_aligned = any(aligned(d, from_domain, record.strict_dkim) for d in dkim_pass_domains)
    spf_aligned = spf_result == "pass" and bool(spf_domain) and aligned(
        spf_domain, from_domain, record.strict_spf
    )
    if dkim_aligned or spf_aligned:
        how = "DKIM" if dkim_aligned else "SPF"
        return DmarcOutcome("pass", from_domain, policy, "none", f"aligned {how} pass",
                            dkim_aligned=dkim_aligned, spf_aligned=spf_aligned)
    disposition = policy
    if record.percent < 100 and sample() * 100 >= record.percent:
        # 6.6.4: outside the sampled share, the next weaker policy applies.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcOutcome("fail", from_domain, policy, disposition, "no aligned DKIM or SPF pass")
