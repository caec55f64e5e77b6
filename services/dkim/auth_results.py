"""Authentication-Results (RFC 8601): the header SecuMail adds, and the reading of an
authserv-id that tells which of the message's own such headers claim to be ours."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from secumail.dmarc import DmarcOutcome

# RFC 8601 2.2 property values: a dot-atom-ish token or a quoted string.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Unparsable(ValueError):
    """An Authentication-Results value that does not follow RFC 8601's grammar."""


# RFC 2045 token: any printable ASCII but tspecials and space.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def _blank(char: str) -> bool:
    """White space as a reader may see it: any Unicode white space (NBSP, U+2000-U+200A,
    U+3000, U+2028...) and any invisible format character (U+200B, U+FEFF, U+180E, U+2060,
    soft hyphen...). A mail client shows NBSP before "mx.example" as a space, and U+200B as
    nothing: such characters must not make a header that shows our authserv-id read as
    another host's."""
    if char < "\x80":  # ASCII (most of every header): no format character there
        return char.isspace()
    return char.isspace() or unicodedata.category(char) == "Cf"


def _comparable(text: str) -> str:
    """Text as compared with our authserv-id: compatibility forms folded (fullwidth letters,
    U+3000), every blank removed, any case."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if not _blank(c)).casefold()


@functools.lru_cache(maxsize=8)
def _comparable_id(authserv_id: str) -> str:
    """Our own authserv-id as compared (one per host: worked out once)."""
    return _comparable(authserv_id).rstrip(".")


def _skip_cfws(text: str, at: int) -> int:
    """The index after any folding white space (or other blank, see _blank) and comments
    (nested, with quoted-pairs)."""
    depth = 0
    while at < len(text):
        char = text[at]
        if depth and char == "\\":
            at += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and not _blank(char):
            return at
        at += 1
    if depth:
        raise Unparsable("unterminated comment")
    return at


def _read_value(text: str, at: int) -> tuple[str, int]:
    """An RFC 2045 value (token or quoted-string) at `at`: its text and the index after it."""
    if at < len(text) and text[at] == '"':
        chars = []
        at += 1
        while at < len(text) and text[at] != '"':
            if text[at] == "\\":
                at += 1
                if at == len(text):
                    break
            chars.append(text[at])
            at += 1
        if at >= len(text):
            raise Unparsable("unterminated quoted string")
        return "".join(chars), at + 1
    start = at
    while at < len(text) and text[at] > " " and text[at] != "\x7f" \
            and text[at] not in _TSPECIALS and not _blank(text[at]):
        at += 1
    if at == start:
        raise Unparsable(f"no authserv-id at {text[start:start + 20]!r}")
    return text[start:at], at


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 2.2) as compared (see
    _comparable) and without a final dot: [CFWS] authserv-id [CFWS authres-version] then
    ";" or the end (no-result). Unparsable raises: a reader more lenient than this one might
    still take such a header for ours."""
    identifier, at = _read_value(value, _skip_cfws(value, 0))
    at = _skip_cfws(value, at)
    if at < len(value) and value[at].isdigit():  # the version, "1"
        while at < len(value) and value[at].isdigit():
            at += 1
        at = _skip_cfws(value, at)
    if at < len(value) and value[at] != ";":
        raise Unparsable(f"unexpected {value[at:at + 20]!r} after the authserv-id")
    return _comparable(identifier).rstrip(".")


def claims_to_be(value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value speaks for `authserv_id`: its own authserv-id
    is ours, in any spelling; or it cannot be parsed and names us anywhere (a lenient
    reader could take it for ours, and a malformed header is no loss). Blanks count as
    nothing: a name cut by an invisible U+200B, unparsable, still names us."""
    ours = _comparable_id(authserv_id)
    try:
        return authserv_id_of(value) == ours
    except Unparsable:
        return ours in _comparable(value)


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    domain: str  # the domain SPF authenticated: MAIL FROM's, or HELO's for a null sender
    identity: str  # "mailfrom" or "helo"


def _value(text: str) -> str:
    """A property value: plain, or quoted, with control characters (CR, LF: the signature
    fields and errors quoted here come from the sender) made harmless."""
    if _PLAIN_VALUE.match(text):
        return text
    text = _CONTROL.sub("?", text)
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
    if outcome.arc_override:
        parts.append(f"(p={outcome.policy} dis={outcome.disposition}; arc=pass, dmarc=pass "
                     f"at trusted sealer {outcome.arc_override}) policy.override=arc")
    elif outcome.policy:
        parts.append(f"(p={outcome.policy} dis={outcome.disposition})")
    if outcome.result in ("temperror", "permerror") and outcome.reason:
        parts.append(f"reason={_value(outcome.reason)}")
    if outcome.domain:
        parts.append(f"header.from={_value(outcome.domain)}")
    return " ".join(parts)


@dataclass(frozen=True)
class ArcReport:
    result: str  # pass, fail (a message without ARC fields gets no arc= entry)
    reason: str = ""
    remote_ip: str = ""
    oldest_pass: int | None = None
    instances: int = 0


def arc_entry(report: ArcReport) -> str:
    """RFC 8617 7.2: `arc=` with the client's address and, on a pass, the oldest instance
    whose message signature still verifies (0: all)."""
    parts = [f"arc={report.result}"]
    if report.instances:
        parts.append(f"({report.instances} set{'s' if report.instances > 1 else ''})")
    if report.reason:
        parts.append(f"reason={_value(report.reason)}")
    if report.remote_ip:
        parts.append(f"smtp.remote-ip={_value(report.remote_ip)}")
    if report.oldest_pass is not None:
        parts.append(f"header.oldest-pass={report.oldest_pass}")
    return " ".join(parts)


def authentication_results(
    authserv_id: str, dkim: list[DkimReport], spf: SpfResult | None, dmarc: DmarcOutcome | None,
    arc: ArcReport | None = None,
) -> str:
    """The header value (after the colon, without the leading space), one result a line,
    folded with \\n TAB (the form Postfix takes from a milter)."""
    entries = [dkim_entry(r) for r in dkim] or ["dkim=none"]
    if spf is not None:
        entries.append(spf_entry(spf))
    if arc is not None:
        entries.append(arc_entry(arc))
    if dmarc is not None:
        entries.append(dmarc_entry(dmarc))
    return authserv_id + ";\n\t" + ";\n\t".join(entries)
