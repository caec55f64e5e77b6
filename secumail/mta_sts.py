"""Our own MTA-STS policy (RFC 8461) and the DNS records that go with it.

MTA-STS lets a domain ask senders for authenticated TLS: a sender that knows the policy never
hands our mail over a connection an attacker stripped of STARTTLS or answered with a false
certificate. The policy is a small text file served over HTTPS at
https://mta-sts.<domain>/.well-known/mta-sts.txt (the gateway serves it, behind the admin's
HTTPS proxy), announced by a TXT record whose id changes whenever the policy does; a second
record (_smtp._tls, RFC 8460) says where senders report TLS failures. Plain functions here,
for the gateway's route and the records it tells the admin to publish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: at most a year


def policy_text(mode: str, mx: list[str], max_age: int) -> str:
    """The policy file: `key: value` lines, each ending in CRLF (RFC 8461 3.2)."""
    return "".join(f"{line}\r\n" for line in policy_lines(mode, mx, max_age))


def policy_lines(mode: str, mx: Iterable[str], max_age: int | str) -> list[str]:
    """A policy's lines, in the policy file's order (ours, or a destination's in a TLS
    report's policy-string)."""
    return ["version: STSv1", f"mode: {mode}", *(f"mx: {host}" for host in mx),
            f"max_age: {max_age}"]


def policy_id(text: str) -> str:
    """An id for the TXT record that changes with the policy (1 to 32 letters and digits)."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    why: str


def records(domain: str, text: str, report_to: str, serving_host: str) -> list[Record]:
    """What to publish in `domain`'s zone for the policy `text`."""
    return [
        Record(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id(text)}",
               "announces the policy; its id changes with it, so senders fetch it again"),
        Record(f"mta-sts.{domain}", "CNAME", serving_host,
               "the HTTPS host senders fetch the policy from: a certificate valid for this "
               "name, proxying /.well-known/mta-sts.txt to the gateway"),
        Record(f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:{report_to}",
               "where senders send their daily TLS reports (RFC 8460)"),
    ]
