"""Authentication-Results (RFC 8601): the header SecuMail adds, the forged ones it removes,
and the SPF result it takes from the policy service's Received-SPF header."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.dkim.dmarc import DmarcOutcome

_COMMENT = re.compile(r"\([^()]*\)")
_SPF_PAIR = re.compile(r'([a-z][a-z0-9-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.IGNORECASE)
_SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# RFC 8601 2.2 property values: a dot-atom-ish token or a quoted string.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+\Z")


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results header names (before its first ';')."""
    head = value.split(";", 1)[0]
    while True:  # comments may nest: strip the innermost first
        stripped = _COMMENT.sub(" ", head)
        if stripped == head:
            break
        head = stripped
    words = head.split()
    return words[0].strip('"').lower() if words else ""


@dataclass(frozen=True)
class SpfResult:
    result: str  # one of _SPF_RESULTS
    domain: str  # the domain SPF authenticated: MAIL FROM's, or HELO's for a null sender
    identity: str  # "mailfrom" or "helo"


def parse_received_spf(value: str, receiver: str) -> SpfResult | None:
    """The policy service's Received-SPF header (RFC 7208 9.1), if `receiver=` is this host."""
    words = value.split(None, 1)
    if not words or words[0].lower() not in _SPF_RESULTS:
        return None
    pairs: dict[str, str] = {}
    for name, raw in _SPF_PAIR.findall(_COMMENT.sub(" ", words[1] if len(words) > 1 else "")):
        pairs.setdefault(name.lower(), raw.strip('"'))
    if pairs.get("receiver", "").lower() != receiver.lower():
        return None
    identity = pairs.get("identity", "mailfrom").lower()
    sender = pairs.get("envelope-from", "")
    if identity == "helo" or "@" not in sender:
        return SpfResult(words[0].lower(), pairs.get("helo", "").lower().rstrip("."), "helo")
    return SpfResult(words[0].lower(), sender.rpartition("@")[2].lower().rstrip("."), "mailfrom")


def _value(text: str) -> str:
    if _PLAIN_VALUE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class DkimReport:
    result: str
    reason: str = ""
    domain: str = ""
    identity: str = ""
    selector: str = ""
    algorithm: str = ""
    b_prefix: str = ""
    key_bits: int = 0
    key_type: str = ""


def dkim_entry(report: DkimReport) -> str:
    parts = [f"dkim={report.result}"]
    if report.key_bits:
        parts.append(f"({report.key_bits}-bit {report.key_type} key)")
    if report.reason:
        parts.append(f"reason={_value(report.reason)}")
    for name, value in (
        ("header.d", report.domain), ("header.i", report.identity),
        ("header.s", report.selector), ("header.a", report.algorithm),
        ("header.b", report.b_prefix),
    ):
        if value:
            parts.append(f"{name}={_value(value)}")
    return " ".join(parts)


def spf_entry(spf: SpfResult) -> str:
    property_name = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
    return f"spf={spf.result} {property_name}={_value(spf.domain)}" if spf.domain else (
        f"spf={spf.result}"
    )


def dmarc_entry(outcome: DmarcOutcome) -> str:
    parts = [f"dmarc={outcome.result}"]
    if outcome.policy:
        parts.append(f"(p={outcome.policy} dis={outcome.disposition})")
    if outcome.result in ("temperror", "permerror") and outcome.reason:
        parts.append(f"reason={_value(outcome.reason)}")
    if outcome.domain:
        parts.append(f"header.from={_value(outcome.domain)}")
    return " ".join(parts)


def authentication_results(
    authserv_id: str, dkim: list[DkimReport], spf: SpfResult | None, dmarc: DmarcOutcome | None
) -> str:
    """The header value (after the colon, without the leading space), one result a line,
    folded with \\n TAB (the form Postfix takes from a milter)."""
    entries = [dkim_entry(r) for r in dkim] or ["dkim=none"]
    if spf is not None:
        entries.append(spf_entry(spf))
    if dmarc is not None:
        entries.append(dmarc_entry(dmarc))
    return authserv_id + ";\n\t" + ";\n\t".join(entries)
