"""DMARC evaluation, Authentication-Results text and the SPF result from Received-SPF."""

from __future__ import annotations

import asyncio

import pytest
import spf as pyspf

from services.dkim import authres, dmarc


@pytest.mark.parametrize(
    ("domain", "organizational"),
    [
        ("mail.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("example.com", "example.com"),
        ("co.uk", "co.uk"),
        ("x.secumail.test", "secumail.test"),  # .test is no listed suffix: one label is
    ],
)
def test_organizational_domain(domain: str, organizational: str) -> None:
    assert dmarc.organizational_domain(domain) == organizational


def test_alignment() -> None:
    assert dmarc.aligned("mail.example.com", "example.com", strict=False)
    assert not dmarc.aligned("mail.example.com", "example.com", strict=True)
    assert dmarc.aligned("Example.COM.", "example.com", strict=True)
    assert not dmarc.aligned("example.net", "example.com", strict=False)
    assert not dmarc.aligned("evil.co.uk", "example.co.uk", strict=False)


@pytest.mark.parametrize(
    ("values", "domains"),
    [
        (["alice@example.org"], ["example.org"]),
        (["Alice <alice@Mail.Example.org>"], ["mail.example.org"]),
        (['"Doe, John" <john@example.net>'], ["example.net"]),
        (["a@one.example, b@two.example"], ["one.example", "two.example"]),
        (["undisclosed-recipients:;"], []),
        ([], []),
    ],
)
def test_from_domains(values: list[str], domains: list[str]) -> None:
    assert dmarc.from_domains(values) == domains


def test_parse_record() -> None:
    record = dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50; rua=mailto:x@y")
    assert record == dmarc.DmarcRecord("reject", "none", True, False, 50)
    assert dmarc.parse_record("v=DMARC1; p=quarantine") == dmarc.DmarcRecord(
        "quarantine", "quarantine", False, False, 100)
    assert dmarc.parse_record("v=spf1 -all") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus").policy == "none"  # type: ignore[union-attr]


def run_find(records: dict[str, list[str]], domain: str,
             failing: str = "") -> tuple[dmarc.DmarcRecord | None, bool]:
    async def lookup(name: str) -> list[str] | None:
        if name == failing:
            raise dmarc.DnsTemporaryError(name)
        return records.get(name)

    return asyncio.run(dmarc.find_record(domain, lookup))


def test_record_falls_back_to_the_organizational_domain() -> None:
    records = {"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"]}
    record, from_organizational = run_find(records, "mail.example.com")
    assert record is not None and from_organizational
    assert run_find(records, "example.com")[1] is False
    assert run_find({}, "example.com") == (None, False)
    doubled = {"_dmarc.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    assert run_find(doubled, "example.com") == (None, False)
    with pytest.raises(dmarc.DnsTemporaryError):
        run_find(records, "example.com", failing="_dmarc.example.com")


REJECT = dmarc.DmarcRecord("reject", "quarantine", False, False, 100)


@pytest.mark.parametrize(
    ("dkim_domains", "spf_result", "spf_domain", "result"),
    [
        (["example.com"], "none", "", "pass"),
        (["mail.example.com"], "none", "", "pass"),  # relaxed alignment
        (["other.net"], "pass", "bounces.example.com", "pass"),  # SPF aligned
        (["other.net"], "pass", "other.net", "fail"),
        ([], "softfail", "example.com", "fail"),
        ([], "none", "", "fail"),
    ],
)
def test_evaluate(dkim_domains: list[str], spf_result: str, spf_domain: str,
                  result: str) -> None:
    outcome = dmarc.evaluate("example.com", REJECT, False, dkim_domains, spf_result, spf_domain)
    assert outcome.result == result
    assert outcome.policy == "reject"
    assert outcome.disposition == ("reject" if result == "fail" else "none")


def test_evaluate_subdomain_policy_strict_mode_and_sampling() -> None:
    sub = dmarc.evaluate("mail.example.com", REJECT, True, [], "none", "")
    assert (sub.result, sub.policy) == ("fail", "quarantine")
    strict = dmarc.DmarcRecord("reject", "reject", True, True, 100)
    assert dmarc.evaluate("example.com", strict, False, ["mail.example.com"], "none",
                          "").result == "fail"
    half = dmarc.DmarcRecord("reject", "reject", False, False, 50)
    assert dmarc.evaluate("example.com", half, False, [], "none", "",
                          sample=lambda: 0.9).disposition == "quarantine"
    assert dmarc.evaluate("example.com", half, False, [], "none", "",
                          sample=lambda: 0.1).disposition == "reject"
    assert dmarc.evaluate("example.com", None, False, [], "none", "").result == "none"


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        (" mx.secumail.test; dkim=pass", "mx.secumail.test"),
        ("MX.Secumail.Test 1; spf=pass", "mx.secumail.test"),
        (" (forged) mx.secumail.test (really);\n\tdkim=pass", "mx.secumail.test"),
        (' "quoted.example"; none', "quoted.example"),
        ("", ""),
    ],
)
def test_authserv_id(value: str, authserv_id: str) -> None:
    assert authres.authserv_id_of(value) == authserv_id


def policy_header(result: str, sender: str, helo: str, receiver: str) -> str:
    """Received-SPF exactly as services/policy/spf.py writes it (pyspf's text)."""
    query = pyspf.query(i="203.0.113.7", s=sender, h=helo, receiver=receiver)
    query.mechanism = "ip4:203.0.113.0/24"  # what query.check() would have set
    header = query.get_header(result, receiver=receiver)
    return result + header[header.index(" "):]


def test_received_spf_from_the_policy_service() -> None:
    header = policy_header("pass", "alice@Bounce.Remote.test", "mail.remote.test",
                           "mx.secumail.test")
    assert authres.parse_received_spf(header, "mx.secumail.test") == authres.SpfResult(
        "pass", "bounce.remote.test", "mailfrom")
    # Another receiver's header (added upstream, or forged) is not this host's result.
    assert authres.parse_received_spf(header, "mx.other.test") is None
    null_sender = policy_header("softfail", "", "mail.remote.test", "mx.secumail.test")
    assert authres.parse_received_spf(null_sender, "mx.secumail.test") == authres.SpfResult(
        "softfail", "mail.remote.test", "helo")
    assert authres.parse_received_spf("bogus text", "mx.secumail.test") is None


def test_authentication_results_text() -> None:
    reports = [
        authres.DkimReport("pass", "", "example.com", "@example.com", "s1", "rsa-sha256",
                           "AbCdEf12", 2048, "rsa"),
        authres.DkimReport("fail", "body hash did not verify", "example.com", "@example.com",
                           "e1", "ed25519-sha256", "Zz+/0123", 256, "ed25519"),
    ]
    spf = authres.SpfResult("pass", "example.com", "mailfrom")
    outcome = dmarc.DmarcOutcome("pass", "example.com", "reject", "none")
    value = authres.authentication_results("mx.secumail.test", reports, spf, outcome)
    assert value.split(";\n\t") == [
        "mx.secumail.test",
        "dkim=pass (2048-bit rsa key) header.d=example.com header.i=@example.com "
        "header.s=s1 header.a=rsa-sha256 header.b=AbCdEf12",
        'dkim=fail (256-bit ed25519 key) reason="body hash did not verify" '
        "header.d=example.com header.i=@example.com header.s=e1 header.a=ed25519-sha256 "
        "header.b=Zz+/0123",
        "spf=pass smtp.mailfrom=example.com",
        "dmarc=pass (p=reject dis=none) header.from=example.com",
    ]
    assert authres.authentication_results("mx", [], None, None) == "mx;\n\tdkim=none"
