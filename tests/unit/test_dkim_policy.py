"""DMARC evaluation, Authentication-Results text and the SPF result from Received-SPF."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secumail import dmarc
from secumail.dns import DnsTemporaryError
from services.dkim import auth_results


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
    record = dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50; "
                                "rua=mailto:x@y, mailto:z@w!10m")
    assert record == dmarc.DmarcRecord("reject", "none", True, False, 50,
                                       ("mailto:x@y", "mailto:z@w!10m"))
    assert dmarc.parse_record("v=DMARC1; p=quarantine") == dmarc.DmarcRecord(
        "quarantine", "quarantine", False, False, 100)
    assert dmarc.parse_record("v=spf1 -all") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus").policy == "none"  # type: ignore[union-attr]


def run_find(records: dict[str, list[str]], domain: str,
             failing: str = "") -> tuple[dmarc.DmarcRecord | None, bool]:
    async def lookup(name: str) -> list[str] | None:
        if name == failing:
            raise DnsTemporaryError(name)
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
    with pytest.raises(DnsTemporaryError):
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
        (" (x;y) mx.secumail.test; dkim=pass", "mx.secumail.test"),
        (" (a (b; c) \\) d) mx.secumail.test.", "mx.secumail.test"),
        (' "mx\\.secumail.test" 1 (v1) ; dkim=pass', "mx.secumail.test"),
        (" relay.remote.test (mx.secumail.test); dkim=pass", "relay.remote.test"),
    ],
)
def test_authserv_id(value: str, authserv_id: str) -> None:
    assert auth_results.authserv_id_of(value) == authserv_id


@pytest.mark.parametrize(
    "value", ["", " (unterminated", ' "unterminated', " mx.secumail.test junk; x", " ;none"])
def test_unparsable_authserv_id(value: str) -> None:
    with pytest.raises(auth_results.Unparsable):
        auth_results.authserv_id_of(value)


def test_an_unparsable_header_naming_us_counts_as_ours() -> None:
    assert auth_results.claims_to_be(" mx.secumail.test junk; dkim=pass", "mx.secumail.test")
    assert auth_results.claims_to_be(" (mx.SECUMAIL.test", "mx.secumail.test")
    assert not auth_results.claims_to_be(" (other", "mx.secumail.test")


OURS = "mx.secumail.test"
_comment_text = st.text(alphabet=st.sampled_from("ab;:= \t\"@"), max_size=6)


@st.composite
def comments(draw: st.DrawFn, depth: int = 2) -> str:
    """An RFC 5322 comment: text with ';' and quotes, quoted-pairs, nested comments."""
    parts = draw(st.lists(st.one_of(
        _comment_text, st.sampled_from(["\\(", "\\)", "\\\\"]),
        *([comments(depth - 1)] if depth else [])), max_size=3))
    return "(" + "".join(parts) + ")"


cfws = st.lists(st.one_of(st.sampled_from([" ", "\t", "\r\n\t", "\n "]), comments()),
                max_size=3).map("".join)


@st.composite
def spellings(draw: st.DrawFn, identifier: str) -> str:
    """`identifier` as an authserv-id may be written: any case, maybe quoted with
    quoted-pairs, maybe a final dot."""
    text = "".join(c.upper() if draw(st.booleans()) else c for c in identifier)
    if draw(st.booleans()):
        text += "."
    if draw(st.booleans()):
        text = '"' + "".join("\\" + c if draw(st.booleans()) else c for c in text) + '"'
    return text


@st.composite
def results_headers(draw: st.DrawFn, identifier: str) -> str:
    version = draw(st.sampled_from(["", " 1", " 1" + " (v)"]))
    return (draw(cfws) + " " + draw(spellings(identifier)) + version + draw(cfws)
            + "; dkim=pass header.d=paypal.test")


@given(results_headers(OURS))
def test_any_spelling_of_our_authserv_id_is_ours(value: str) -> None:
    assert auth_results.claims_to_be(value, OURS)


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
       .filter(lambda other: other != OURS).flatmap(results_headers))
def test_another_hosts_results_are_not_ours(value: str) -> None:
    assert not auth_results.claims_to_be(value, OURS)


def test_authentication_results_text() -> None:
    reports = [
        auth_results.DkimReport("pass", "", "example.com", "@example.com", "s1", "rsa-sha256",
                           "AbCdEf12", 2048, "rsa"),
        auth_results.DkimReport("fail", "body hash did not verify", "example.com", "@example.com",
                           "e1", "ed25519-sha256", "Zz+/0123", 256, "ed25519"),
    ]
    spf = auth_results.SpfResult("pass", "example.com", "mailfrom")
    outcome = dmarc.DmarcOutcome("pass", "example.com", "reject", "none")
    value = auth_results.authentication_results("mx.secumail.test", reports, spf, outcome)
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
    assert auth_results.authentication_results("mx", [], None, None) == "mx;\n\tdkim=none"


# --- Issue 30: white space a mail client shows, but RFC 5322 does not know -----------------

# Unicode white space and invisible format characters: a reader shows each as a space or as
# nothing, so "<NBSP>mx.secumail.test" looks like our authserv-id and must count as it.
UNICODE_BLANKS = ("\u00a0", *map(chr, range(0x2000, 0x200C)), "\u3000", "\ufeff", "\u2028",
                  "\u2029", "\u180e", "\u202f", "\u205f", "\u2060")
unicode_blanks = st.text(alphabet=st.sampled_from(UNICODE_BLANKS), min_size=1, max_size=3)
unicode_cfws = st.lists(st.one_of(st.sampled_from([" ", "\t", "\r\n\t"]), comments(),
                                  unicode_blanks), max_size=3).map("".join)


@st.composite
def results_headers_with_unicode_blanks(draw: st.DrawFn, identifier: str) -> str:
    """An Authentication-Results value with at least one Unicode blank right before or right
    after the authserv-id, and maybe more in the CFWS around it."""
    before, after = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    version = draw(st.sampled_from(["", " 1", "\u00a01", " 1" + " (v)"]))
    return (draw(unicode_cfws) + (draw(unicode_blanks) if before else " ")
            + draw(spellings(identifier)) + (draw(unicode_blanks) if after else "")
            + version + draw(unicode_cfws) + "; dkim=pass header.d=paypal.test")


@given(results_headers_with_unicode_blanks(OURS))
def test_our_authserv_id_next_to_unicode_blanks_is_ours(value: str) -> None:
    assert auth_results.claims_to_be(value, OURS)


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
       .filter(lambda other: other != OURS).flatmap(results_headers_with_unicode_blanks))
def test_another_hosts_results_next_to_unicode_blanks_are_not_ours(value: str) -> None:
    assert not auth_results.claims_to_be(value, OURS)


@pytest.mark.parametrize(
    "value",
    [
        "\u00a0mx.secumail.test; dkim=pass header.d=paypal.test",
        " mx.secumail.test\u3000; dkim=pass",
        "\u3000mx.secumail.test\u3000; dkim=pass",
        " (forged)\u200bmx.secumail.test; dkim=pass",
        "\ufeffmx.secumail.test 1; dkim=pass",
        " mx.secumail.test\u2028\t(really)\u205f; dkim=pass",
        "\u180e\u202fmx.secumail.test\u00a01; dkim=pass",
        ' \u00a0"mx.secumail\\.test"; dkim=pass',
        ' "\u00a0mx.secumail.test\u3000"; dkim=pass',  # blanks inside the quotes show as well
        " mx.secu\u200bmail.test; dkim=pass",  # an invisible cut in the name: still our name
        " \uff4d\uff58.secumail.test; dkim=pass",  # fullwidth "mx"
    ],
    ids=["nbsp-before", "ideographic-after", "ideographic-both", "zwsp-after-comment",
         "bom", "line-separator-and-comment", "mongolian-and-narrow-nbsp-version",
         "nbsp-before-quoted", "blanks-inside-quotes", "zwsp-inside-name", "fullwidth"],
)
def test_unicode_blanks_do_not_hide_our_authserv_id(value: str) -> None:
    assert auth_results.claims_to_be(value, OURS)


def test_unicode_blanks_are_white_space_to_the_parser() -> None:
    assert auth_results.authserv_id_of("\u00a0MX.secumail.test.\u3000 1\u2003; x") == OURS
    assert auth_results.authserv_id_of(
        "\u00a0relay.remote.test\u00a0(mx.secumail.test); x") == "relay.remote.test"
    assert not auth_results.claims_to_be("\u3000relay.remote.test\u200b; dkim=pass", OURS)
