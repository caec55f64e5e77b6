"""Greylisting decisions with a hand-held clock: nobody sleeps for 300 seconds."""

from __future__ import annotations

from ipaddress import ip_address

from secumail.greylist_store import ClientRecord, Triplet, record_pass, triplet_key
from secumail.netaddr import client_network
from services.policy.greylist import (
    ClientWhitelist,
    GreylistConfig,
    RecipientWhitelist,
    check_triplet,
    client_is_whitelisted,
    greylist_header,
)

CFG = GreylistConfig(delay=300, retry_window=2 * 86400, max_age=35 * 86400, auto_whitelist=5)
T0 = 1_800_000_000.0


def test_first_sight_is_deferred_for_the_whole_delay() -> None:
    verdict = check_triplet(None, T0, CFG)
    assert verdict.defer and verdict.retry_in == 300
    assert verdict.entry == Triplet(T0, T0, passed=False)


def test_retry_too_early_is_deferred_with_the_time_left() -> None:
    verdict = check_triplet(Triplet(T0, T0), T0 + 100, CFG)
    assert verdict.defer and verdict.retry_in == 200
    assert verdict.entry.first_seen == T0 and verdict.entry.last_seen == T0 + 100


def test_retry_after_delay_passes_and_reports_the_delay() -> None:
    verdict = check_triplet(Triplet(T0, T0 + 100), T0 + 305, CFG)
    assert not verdict.defer
    assert verdict.delayed == 305
    assert verdict.entry.passed


def test_passed_triplet_passes_without_new_delay() -> None:
    verdict = check_triplet(Triplet(T0, T0 + 305, passed=True), T0 + 86400, CFG)
    assert not verdict.defer and verdict.delayed is None
    assert verdict.entry.last_seen == T0 + 86400


def test_retry_after_the_retry_window_starts_over() -> None:
    late = T0 + 2 * 86400 + 1
    verdict = check_triplet(Triplet(T0, T0), late, CFG)
    assert verdict.defer and verdict.entry == Triplet(late, late)


def test_entries_expire_after_max_age() -> None:
    later = T0 + 35 * 86400 + 1
    verdict = check_triplet(Triplet(T0, T0, passed=True), later, CFG)
    assert verdict.defer and verdict.entry == Triplet(later, later)


def test_zero_delay_passes_on_first_retry() -> None:
    cfg = GreylistConfig(delay=0)
    assert check_triplet(None, T0, cfg).defer  # a first sight is always deferred
    assert not check_triplet(Triplet(T0, T0), T0, cfg).defer


def key(client: str, sender: str, recipient: str) -> str:
    return triplet_key(client_network(ip_address(client)), sender, recipient)


def test_triplet_groups_ipv4_by_24_and_ipv6_by_64() -> None:
    assert key("192.0.2.1", "A@X.example", "b@y.example") == key(
        "192.0.2.254", "a@x.example", "B@Y.example"
    )
    assert key("192.0.2.1", "a@x", "b@y") == "192.0.2.0/24/a@x/b@y"
    assert key("192.0.2.1", "a@x", "b@y") != key("192.0.3.1", "a@x", "b@y")
    assert key("2001:db8::1", "", "b@y") == key("2001:db8::ffff:1", "", "b@y")
    assert key("2001:db8::1", "", "b@y") == "2001:db8::/64/<>/b@y"
    assert key("2001:db8::1", "", "b@y") != key("2001:db8:0:1::1", "", "b@y")


HOUR = 3600


def test_auto_whitelist_after_n_passes_an_hour_apart() -> None:
    record = None
    for i in range(5):
        assert not client_is_whitelisted(record, T0 + i * HOUR, CFG)
        record = record_pass(record, T0 + i * HOUR, CFG.max_age)
    assert record == ClientRecord(5, T0 + 4 * HOUR)
    assert client_is_whitelisted(record, T0 + 4 * HOUR + 10, CFG)
    assert not client_is_whitelisted(record, T0 + 36 * 86400, CFG)  # expired
    assert not client_is_whitelisted(record, T0 + 10, GreylistConfig(auto_whitelist=0))
    # A count older than max_age starts over, as the record would have been purged.
    assert record_pass(record, T0 + 4 * HOUR + CFG.max_age + 1, CFG.max_age) == ClientRecord(
        1, T0 + 4 * HOUR + CFG.max_age + 1
    )


def test_passes_within_an_hour_count_once() -> None:
    """postgrey's rule: a session with many recipients, or a burst, is one pass."""
    record = record_pass(None, T0, CFG.max_age)
    assert record == ClientRecord(1, T0)
    assert record_pass(record, T0 + 1, CFG.max_age) is None
    assert record_pass(record, T0 + HOUR - 1, CFG.max_age) is None
    assert record_pass(record, T0 + HOUR, CFG.max_age) == ClientRecord(2, T0 + HOUR)
    # Replicas' clocks differ a little: a pass just "before" the last one is the same hour.
    assert record_pass(record, T0 - 10, CFG.max_age) is None
    assert record_pass(record, T0 - HOUR, CFG.max_age) == ClientRecord(2, T0 - HOUR)


def test_client_whitelist_by_ip_network_host_and_domain() -> None:
    whitelist = ClientWhitelist(
        [
            "192.0.2.10",
            "198.51.100.0/24",
            "[2001:db8::]/32",
            "mx.partner.example",
            "bigmail.example",
        ]
    )
    assert whitelist.matches(ip_address("192.0.2.10"), "unknown")
    assert not whitelist.matches(ip_address("192.0.2.11"), "unknown")
    assert whitelist.matches(ip_address("198.51.100.200"), "")
    assert whitelist.matches(ip_address("2001:db8:1::5"), "")
    assert whitelist.matches(ip_address("203.0.113.1"), "mx.partner.example")
    assert not whitelist.matches(ip_address("203.0.113.1"), "evil-mx.partner.example.attacker.test")
    assert whitelist.matches(ip_address("203.0.113.1"), "out-17.bigmail.example.")
    assert not whitelist.matches(ip_address("203.0.113.1"), "notbigmail.example")


def test_recipient_whitelist() -> None:
    whitelist = RecipientWhitelist(["abuse@secumail.test", "postmaster@", "lists.example"])
    assert whitelist.matches("Abuse@secumail.test")
    assert whitelist.matches("postmaster@anything.example")
    assert whitelist.matches("x@lists.example") and whitelist.matches("x@eu.lists.example")
    assert not whitelist.matches("bob@secumail.test")


def test_header_says_how_long_and_who() -> None:
    header = greylist_header(305.7, "mx.secumail.test", T0)
    assert header.startswith("X-Greylist: delayed 305 seconds by SecuMail at mx.secumail.test; ")
    assert header.endswith("GMT")


def test_header_of_selective_greylisting_says_why() -> None:
    passed = greylist_header(None, "mx.secumail.test", T0, "score -1 (spf-pass -1)")
    assert passed.startswith("X-Greylist: not delayed by SecuMail at mx.secumail.test, "
                             "score -1 (spf-pass -1); ")
    delayed = greylist_header(300, "mx", T0, "score 3 (no-rdns +2, helo-unresolved +1)")
    assert delayed.startswith("X-Greylist: delayed 300 seconds by SecuMail at mx, score 3 (")
