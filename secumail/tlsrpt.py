"""TLS reports (RFC 8460) about the mail SecuMail sends: for each destination domain that
asks for them (a `_smtp._tls` TXT record with rua=mailto:), once a day, how many SMTP
sessions to its MX hosts set up TLS as its policy demands, and why the others failed.

Postfix's log says it, a delivery at a time: the smtp client logs "Verified TLS connection
established to mx[ip]:25", a certificate check that failed, then each recipient's status
("deferred (Server certificate not verified)", "TLS is required, but was not offered").
The Postfix container turns each session into a `Session` (services/postfix/events.py),
with the MTA-STS policy the resolver beside it applied, and records it as a tracking event
(outcome "tls", a note on the message's path); the gateway counts the sessions per day and
domain in a `SessionStore` as it collects the events, and after midnight UTC mails each
domain that asks its report (`report_json`, `report_mail`), DKIM-signed, through Postfix
(gateway/dmarc_reports.py). Plain functions and a small store here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from secumail.dmarc_reports import (
    DAY,
    ReportStore,
    day_of,
    day_start,
    report_message,
    unique_id,
)
from secumail.tracking import MAX_FIELD

POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
# RFC 8460 4.3: the result types a failed session is reported with.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
# The levels Postfix logs a TLS connection with ("Verified TLS connection established"),
# and "none" for a session without TLS.
LEVELS = ("verified", "trusted", "untrusted", "anonymous", "none")


@dataclass(frozen=True)
class Policy:
    """The policy a destination domain had when its mail went out, as a report names it."""

    type: str = "no-policy-found"  # one of POLICY_TYPES
    strings: tuple[str, ...] = ()  # the MTA-STS policy's lines ("mode: enforce", ...)
    mx_patterns: tuple[str, ...] = ()  # its mx: lines


@dataclass(frozen=True)
class Session:
    """One SMTP session of Postfix's smtp client with a destination's MX, as its report
    counts it: a success, or a failure of `failure`'s result type (and Postfix's reason)."""

    domain: str  # the policy domain: the recipients' domain
    mx: str  # receiving-mx-hostname
    ip: str  # receiving-ip
    level: str  # one of LEVELS
    failure: str = ""  # an RFC 8460 result type; empty for a success
    reason: str = ""  # failure-reason-code: what Postfix said
    policy: Policy = Policy()

    def key(self) -> str:
        """The session's identity in the store (its domain is the store's own column)."""
        policy = self.policy  # not astuple(): a deep copy, most of a session's cost
        return json.dumps([self.mx, self.ip, self.level, self.failure, self.reason,
                           [policy.type, policy.strings, policy.mx_patterns]],
                          separators=(",", ":"))

    @classmethod
    def from_key(cls, text: str, domain: str = "") -> Session:
        mx, ip, level, failure, reason, (kind, strings, patterns) = json.loads(text)
        return cls(domain, mx, ip, level, failure, reason,
                   Policy(kind, tuple(strings), tuple(patterns)))

    def detail(self) -> str:
        """The tracking event's detail: said for the admin, then the session as `key` has
        it, read back by `from_detail`. An MTA-STS policy too long for an event's field
        loses its lines (the report still names its type)."""
        said = f"TLS to {self.mx}[{self.ip}]: {self.level}"
        said += f", failed: {self.failure}" if self.failure else ""
        text = f"{said} ({self.policy.type}); {self.key()}"
        if len(text) > MAX_FIELD:  # at most 253 + 45 + 25 + 60 + 60 or so: it fits
            shorter = replace(self, reason=self.reason[:60], policy=Policy(self.policy.type))
            text = f"TLS {self.level} ({self.policy.type}); {shorter.key()}"
        return text

    @classmethod
    def from_detail(cls, detail: str, domain: str) -> Session:
        """ValueError when the detail is not one `detail` wrote."""
        try:
            session = cls.from_key(detail.split("; ", 1)[1], domain)
        except (IndexError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a TLS session: {error}") from None
        if session.level not in LEVELS or session.policy.type not in POLICY_TYPES:
            raise ValueError("not a TLS session: unknown level or policy type")
        return session


# --- what a session's log lines mean ------------------------------------------------------------

# "server certificate verification failed for mx[ip]:25: num=62:hostname mismatch", and
# without "server"/"num=" for a self-signed certificate.
_CHAIN_ERRORS = {10: EXPIRED, 62: HOST_MISMATCH, 65: TLSA_INVALID}


def chain_failure(text: str) -> str:
    """The result type of the certificate error Postfix logged."""
    found = re.match(r"num=(\d+):", text)
    if found:
        return _CHAIN_ERRORS.get(int(found[1]), NOT_TRUSTED)
    if "expired" in text:
        return EXPIRED
    return NOT_TRUSTED


# Postfix's own replies when it defers mail for TLS (the remote's replies say anything).
_NOT_VERIFIED = ("Server certificate not verified", "Server certificate not trusted")


def mx_matches(mx: str, patterns: Iterable[str]) -> bool:
    """Whether an MX host is one an MTA-STS policy names (RFC 8461 4.1: `*.` matches one
    label)."""
    mx = mx.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if mx.partition(".")[2] == pattern[2:]:
                return True
        elif mx == pattern:
            return True
    return False


def outcome(level: str, chain_error: str, reply: str, deferred: bool, policy: Policy,
            mx: str = "") -> tuple[str, str]:
    """(result type, reason) of a session: ("", "") for a success. A deferral Postfix made
    for TLS is its failure; any other session counts as the policy would have judged it (a
    `testing` policy is reported, not enforced: RFC 8461 5)."""
    if deferred and reply.startswith("TLS is required"):
        return STARTTLS_NOT_SUPPORTED, reply
    if deferred and reply.startswith(_NOT_VERIFIED):
        if chain_error:
            return chain_failure(chain_error), chain_error
        return VALIDATION_FAILURE, reply
    if deferred and reply.startswith("Cannot start TLS"):
        return VALIDATION_FAILURE, reply
    if not deferred and not reply and chain_error:  # an MX Postfix moved past
        return chain_failure(chain_error), chain_error
    if level == "none":
        return STARTTLS_NOT_SUPPORTED, "STARTTLS not offered: the session went in clear"
    if policy.type == "sts":
        if level not in ("verified", "trusted"):
            return NOT_TRUSTED, chain_error or f"{level} TLS: the certificate was not verified"
        if mx and policy.mx_patterns and not mx_matches(mx, policy.mx_patterns):
            return VALIDATION_FAILURE, f"{mx} is not an MX the policy names"
    return "", ""


# --- the report -------------------------------------------------------------------------------

def _datetime(moment: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def report_json(org_name: str, contact: str, report_id: str, day: str, domain: str,
                rows: Iterable[tuple[Session, int]]) -> bytes:
    """The report (RFC 8460 4) of one policy domain and one UTC day: one policy entry per
    policy its sessions had, each with its success count and its failures' details."""
    successes: dict[Policy, int] = {}
    failures: dict[Policy, dict[tuple[str, str, str, str], int]] = {}
    for session, count in rows:
        successes[session.policy] = successes.get(session.policy, 0)
        details = failures.setdefault(session.policy, {})
        if session.failure:
            what = (session.failure, session.mx, session.ip, session.reason[:200])
            details[what] = details.get(what, 0) + count
        else:
            successes[session.policy] += count
    policies: list[dict[str, object]] = []
    begin = day_start(day)
    report = {
        "organization-name": org_name,
        "date-range": {"start-datetime": _datetime(begin),
                       "end-datetime": _datetime(begin + DAY - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }
    for policy, succeeded in successes.items():
        described: dict[str, object] = {"policy-type": policy.type, "policy-domain": domain}
        if policy.strings:
            described["policy-string"] = list(policy.strings)
        if policy.mx_patterns:
            described["mx-host"] = list(policy.mx_patterns)
        item: dict[str, object] = {
            "policy": described,
            "summary": {"total-successful-session-count": succeeded,
                        "total-failure-session-count": sum(failures[policy].values())},
        }
        if failures[policy]:
            item["failure-details"] = [
                {"result-type": kind, "receiving-mx-hostname": mx, "receiving-ip": ip,
                 "failed-session-count": count, "failure-reason-code": reason}
                for (kind, mx, ip, reason), count in sorted(failures[policy].items())]
        policies.append(item)
    return json.dumps(report, indent=1).encode()


def report_mail(org_name: str, sender: str, recipient: str, report_id: str, day: str,
                domain: str, report: bytes, now: float, hostname: str) -> bytes:
    """The report as RFC 8460 5.3 sends it: multipart/report; report-type=tlsrpt, the JSON
    gzip-compressed as application/tlsrpt+gzip, named submitter!domain!begin!end!id."""
    begin = day_start(day)
    return report_message(
        sender, recipient, report_id, now, hostname,
        subject=f"Report Domain: {domain} Submitter: {org_name} Report-ID: <{report_id}>",
        text=f"TLS report from {org_name} for {domain}, {day} (UTC).\n",
        filename=f"{org_name}!{domain}!{begin}!{begin + DAY - 1}!{unique_id(report_id)}"
                 ".json.gz",
        report=report, subtype="tlsrpt+gzip", report_type="tlsrpt",
        headers={"TLS-Report-Domain": domain, "TLS-Report-Submitter": org_name})


MAX_RUA = 5  # addresses a domain's report goes to: a record naming more gets no more


def rua_uris(texts: Iterable[str]) -> list[str]:
    """The rua URIs of a `_smtp._tls` TXT record (RFC 8460 3): `v=TLSRPTv1; rua=a,b`; none
    when no record (or more than one) starts with the version."""
    records = [t for t in texts if re.match(r"v=TLSRPTv1\s*(;|$)", t.strip())]
    if len(records) != 1:
        return []
    for part in records[0].split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.strip() == "rua":
            return [uri.strip() for uri in value.split(",") if uri.strip()]
    return []


# --- the sessions, counted per day and domain -----------------------------------------------------

class SessionStore(ReportStore):
    """Counted sessions per day and policy domain (the DMARC store's tables, rows of
    sessions), and which reports went out. The gateway alone writes it."""

    def add_sessions(self, sessions: Iterable[tuple[float, Session]]) -> int:
        """Count sessions, each on the UTC day of its moment; how many the day's bound left
        out."""
        counts: dict[tuple[str, str, Session], int] = {}
        for moment, session in sessions:
            row = (day_of(moment), session.domain, session)
            counts[row] = counts.get(row, 0) + 1
        return self.add(counts, {})

    def sessions(self, day: str, domain: str) -> list[tuple[Session, int]]:
        return [(Session.from_key(row, domain), count)
                for row, count in self.raw_rows(day, domain)]
