"""Our own domain in mail from outside: the decisions (services/dkim/own_domain.py)."""

from __future__ import annotations

import ipaddress

import pytest

from services.dkim.auth_results import DkimReport
from services.dkim.own_domain import (
    AllowedOutsiders,
    display_name_claim,
    forgery,
    ours,
    signed_by_us,
)

DOMAINS = ["example.org"]
OUR_KEYS = {("example.org", "s1")}
NOBODY = AllowedOutsiders()


def test_ours_is_the_domain_and_its_subdomains() -> None:
    assert ours("example.org", DOMAINS) and ours("HR.Example.org.", DOMAINS)
    assert not ours("badexample.org", DOMAINS) and not ours("example.org.evil", DOMAINS)


@pytest.mark.parametrize("report,ok", [
    (DkimReport("pass", domain="example.org", selector="s1"), True),
    (DkimReport("pass", domain="EXAMPLE.ORG", selector="S1"), True),
    (DkimReport("fail", domain="example.org", selector="s1"), False),
    (DkimReport("pass", domain="example.org", selector="s2"), False),  # not our key
    (DkimReport("pass", domain="evil.example", selector="s1"), False),  # not aligned
])
def test_only_a_verified_aligned_signature_with_our_key_counts(report: DkimReport,
                                                                ok: bool) -> None:
    assert signed_by_us("example.org", [report], OUR_KEYS) is ok


def test_forgery_and_who_may_send_as_us() -> None:
    client = ipaddress.ip_address("198.51.100.7")
    assert forgery("hr.example.org", DOMAINS, [], OUR_KEYS, NOBODY, "x@evil.example",
                   client) == ("From hr.example.org: your own domain from outside, "
                               "not signed with its key")
    assert forgery("example.net", DOMAINS, [], OUR_KEYS, NOBODY, "x@evil.example",
                   client) is None
    allowed = AllowedOutsiders.from_lists(
        ["news@mailer.example", "@bounces.mailer.example", "lists.example"],
        [ipaddress.ip_network("198.51.100.0/24")])
    for sender, address in (("news@mailer.example", "192.0.2.1"),
                            ("a1@x.bounces.mailer.example", "192.0.2.1"),
                            ("owner@lists.example", "192.0.2.1"),
                            ("", "198.51.100.9")):
        assert allowed.allow(sender, ipaddress.ip_address(address)), sender
    assert not allowed.allow("other@mailer.example", ipaddress.ip_address("192.0.2.1"))
    assert not allowed.allow("", None)


@pytest.mark.parametrize("value,claim", [
    ('"ceo@example.org" <x@evil.example>', "ceo@example.org"),
    ("CEO ceo@hr.example.org via <x@evil.example>", "ceo@hr.example.org"),
    ('"CEO" <ceo@example.org>', None),  # the address itself is ours: judged elsewhere
    ('"bob@example.net" <x@evil.example>', None),
    ("x@evil.example (ceo@example.org)", "ceo@example.org"),
    ("x@evil.example", None),
])
def test_a_display_name_claiming_our_address(value: str, claim: str | None) -> None:
    assert display_name_claim([value], DOMAINS) == claim
