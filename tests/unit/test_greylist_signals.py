"""Selective greylisting's signals: plain functions, no DNS (the engine asks it)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from secumail.settings import GREYLIST_SIGNALS, Settings, parse_signal_weights
from services.policy.signals import (
    ClientFacts,
    describe,
    is_address_literal,
    looks_dynamic,
    score,
    signals,
)

IP = ipaddress.ip_address("198.51.100.23")


@pytest.mark.parametrize("name", [
    "198-51-100-23.dsl.isp.test", "23.100.51.198.in-addr.isp.test", "c6336417.isp.test",
    "host-198.51.100.23.example.net", "dyn-4711.isp.test", "pool-12.isp.test",
    "cpe-1-2.cable.isp.test", "ppp23.isp.test", "x.dhcp.isp.test", "adsl-23.isp.test",
])
def test_dynamic_names(name: str) -> None:
    assert looks_dynamic(name, IP)


@pytest.mark.parametrize("name", [
    "mail.remote.test", "mail-wm1-f54.google.com", "smtp.dynamics-corp.test",
    "o1.sendgrid.test", "11.51.100.239.isp.test", "mx23.poolside.test",
])
def test_static_names(name: str) -> None:
    assert not looks_dynamic(name, IP)


@pytest.mark.parametrize("helo,literal", [
    ("[198.51.100.23]", True), ("198.51.100.23", True), ("[IPv6:2001:db8::1]", True),
    ("mail.remote.test", False), ("cafe.face", False), ("localhost", False), ("", False),
])
def test_address_literal_helo(helo: str, literal: bool) -> None:
    assert is_address_literal(helo) is literal


def facts(**changes: object) -> ClientFacts:
    base: dict[str, object] = dict(
        address=IP, reverse_name="mail.remote.test", verified_name="mail.remote.test",
        helo="mail.remote.test", helo_resolves=True, dnsbl_score=0.0, dnswl_score=0.0,
        spf_result="", sender_domain="remote.test", known_senders=frozenset(),
        passed_before=False)
    base.update(changes)
    return ClientFacts(**base)  # type: ignore[arg-type]


def test_a_clean_client_has_no_signal() -> None:
    found = signals(facts(), parse_signal_weights("no-rdns=2, helo-unresolved=1"))
    assert found == [] and score(found) == 0 and describe(found) == "score 0 (no signal)"


def test_every_signal_can_apply_and_zones_scale_their_weights() -> None:
    weights = {name: 1.0 for name in GREYLIST_SIGNALS} | {"dnswl": 2.0}
    found = signals(facts(reverse_name="198-51-100-23.dsl.isp.test", verified_name="unknown",
                          helo="[198.51.100.23]", helo_resolves=False, dnsbl_score=0.5,
                          dnswl_score=-1.5, spf_result="pass", sender_domain="eu.bank.test",
                          known_senders=frozenset({"bank.test"}), passed_before=True),
                    weights)
    names = [name for name, _ in found]
    assert set(names) == set(GREYLIST_SIGNALS) - {"no-rdns"}  # has a PTR, mismatched
    assert dict(found)["dnsbl"] == 0.5 and dict(found)["dnswl"] == -3.0
    assert "no-rdns" in [n for n, _ in signals(facts(reverse_name="unknown"), weights)]


def test_known_senders_match_subdomains_not_lookalikes() -> None:
    weights = {"known-sender": -3.0}
    known = frozenset({"bank.test"})
    assert signals(facts(sender_domain="bank.test", known_senders=known), weights)
    assert signals(facts(sender_domain="alerts.bank.test", known_senders=known), weights)
    assert not signals(facts(sender_domain="evilbank.test", known_senders=known), weights)
    assert not signals(facts(sender_domain="", known_senders=known), weights)
    # A forged sender: SPF was checked and did not pass.
    for result in ("softfail", "neutral", "none", "fail"):
        assert not signals(facts(sender_domain="bank.test", known_senders=known,
                                 spf_result=result), weights)
    assert signals(facts(sender_domain="bank.test", known_senders=known, spf_result="pass"),
                   weights)


def test_describe_is_what_the_log_and_header_show() -> None:
    assert describe([("no-rdns", 2.0), ("spf-pass", -1.0), ("dnsbl", 0.5)]) == (
        "score 1.5 (no-rdns +2, spf-pass -1, dnsbl +0.5)")


@pytest.mark.parametrize("text", ["no-rdns", "nordns=1", "no-rdns=high", "spf-pass=-1,,x=1"])
def test_bad_signal_weights_are_refused_at_start(text: str) -> None:
    with pytest.raises(ValidationError, match="greylist_signals"):
        Settings(greylist_signals=text)


@pytest.mark.parametrize("zone", ["list.dnswl.test*2", "list.dnswl.test*0", "nodot*-1"])
def test_dnswl_zones_need_a_negative_weight(zone: str) -> None:
    with pytest.raises(ValidationError, match="greylist_dnswl_zones"):
        Settings(greylist_dnswl_zones=zone)


def test_settings_parse() -> None:
    settings = Settings(greylist_dnswl_zones="list.dnswl.test*-2, wl.test",
                        greylist_known_senders="Bank.test")
    assert settings.weighted_dnswl_zones == [("list.dnswl.test", -2.0), ("wl.test", -1.0)]
    assert settings.greylist_known_senders == ["bank.test"]
    assert parse_signal_weights(" no-rdns = 2 ,spf-pass=-1") == {"no-rdns": 2.0, "spf-pass": -1.0}
