"""The policy engine end to end without sockets: fake DNS, fake clock, in-memory SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from secumail.greylist_store import ClientRecord, SqliteStore, Triplet
from secumail.settings import Settings
from services.policy.engine import TEMPORARY_FAILURE, PolicyEngine
from testkit.fakes import FakeAsyncResolver, FakeClock, FakeResolver
from testkit.policy_client import rcpt_request


class BrokenStore(SqliteStore):
    async def lookup(self, network: str, key: str) -> Any:
        raise OSError("disk on fire")


@pytest.fixture
def dns() -> FakeResolver:
    resolver = FakeAsyncResolver()
    resolver.add("remote.test", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    resolver.add("forged.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    resolver.add("soft.test", "TXT", '"v=spf1 ~all"')
    resolver.add("7.113.0.203.bl.test", "A", "127.0.0.2")
    resolver.add("7.113.0.203.weak.test", "A", "127.0.0.2")
    return resolver


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_engine(
    dns: FakeResolver, clock: FakeClock, store: SqliteStore | None = None, **overrides: Any
) -> PolicyEngine:
    # postgrey's semantics (every new triplet greylisted) unless a test asks for selective.
    settings = Settings(hostname="mx.secumail.test", **{"greylist_mode": "all", **overrides})
    sync_dns = FakeResolver()
    sync_dns.records, sync_dns.failing = dns.records, dns.failing
    return PolicyEngine(
        settings,
        store or SqliteStore(":memory:"),
        sync_dns,  # type: ignore[arg-type]
        dns,
        clock,  # type: ignore[arg-type]
    )


@pytest.fixture
async def engine(dns: FakeResolver, clock: FakeClock) -> AsyncIterator[PolicyEngine]:
    engine = make_engine(dns, clock, spf_enabled=False)
    yield engine
    engine.close()


async def test_greylist_defers_then_passes_with_header(
    engine: PolicyEngine, clock: FakeClock
) -> None:
    first = await engine.evaluate(rcpt_request(instance="a"))
    assert first.action == "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in 300 seconds"
    assert first.check == "greylist" and first.kind == "defer"
    clock.advance(120)
    early = await engine.evaluate(rcpt_request(instance="b"))
    assert early.action.endswith("try again in 180 seconds")
    clock.advance(200)
    passed = await engine.evaluate(rcpt_request(instance="c"))
    assert passed.kind == "prepend"
    assert passed.action.startswith("PREPEND X-Greylist: delayed 320 seconds by SecuMail at ")
    # The header is added once per transaction, then the triplet simply passes.
    again = await engine.evaluate(rcpt_request(instance="c", recipient="bob@secumail.test"))
    assert again.action == "DUNNO"
    later = await engine.evaluate(rcpt_request(instance="d"))
    assert later.action == "DUNNO"


async def test_neighbour_address_shares_the_triplet(engine: PolicyEngine, clock: FakeClock) -> None:
    await engine.evaluate(rcpt_request(client_address="203.0.113.7"))
    clock.advance(301)
    decision = await engine.evaluate(rcpt_request(client_address="203.0.113.99"))
    assert decision.kind == "prepend"


async def test_trusted_clients_are_never_greylisted(engine: PolicyEngine) -> None:
    local = await engine.evaluate(rcpt_request(client_address="127.0.0.1"))
    assert (local.action, local.check) == ("DUNNO", "trusted")



async def test_authenticated_users_are_trusted_when_the_admin_says_postfix_checks_them(
    dns: FakeResolver, clock: FakeClock
) -> None:
    engine = make_engine(dns, clock, spf_enabled=False, policy_trust_sasl=True)
    authenticated = await engine.evaluate(rcpt_request(sasl_username="alice"))
    assert (authenticated.action, authenticated.check) == ("DUNNO", "trusted")
    engine.close()


async def test_auto_whitelist_after_enough_passes(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock, spf_enabled=False, greylist_auto_whitelist=2)
    for n in range(2):
        recipient = f"user{n}@secumail.test"
        assert (await engine.evaluate(rcpt_request(recipient=recipient))).kind == "defer"
        clock.advance(301)
        retry = rcpt_request(recipient=recipient, instance=f"retry-{n}")
        assert (await engine.evaluate(retry)).kind == "prepend"
        clock.advance(3600)  # passes count once an hour at most
    fresh = await engine.evaluate(rcpt_request(recipient="someone-new@secumail.test"))
    assert fresh.action == "DUNNO"


async def test_a_triplet_that_gets_through_another_way_is_no_longer_shown_waiting(
        dns: FakeResolver, clock: FakeClock) -> None:
    """Issue 32: the console showed a triplet as waiting after its mail got through, because
    its client had been auto-whitelisted meanwhile (or, selective, scored lower)."""
    store = SqliteStore(":memory:")
    engine = make_engine(dns, clock, store, spf_enabled=False, greylist_auto_whitelist=1)
    waiting = rcpt_request(recipient="late@secumail.test")
    assert (await engine.evaluate(waiting)).kind == "defer"
    retry = rcpt_request(recipient="first@secumail.test", instance="x")
    assert (await engine.evaluate(retry)).kind == "defer"
    clock.advance(301)
    assert (await engine.evaluate(rcpt_request(recipient="first@secumail.test",
                                               instance="y"))).kind == "prepend"
    # The client is whitelisted now: the first triplet's retry goes straight through.
    clock.advance(10)
    assert (await engine.evaluate(rcpt_request(recipient="late@secumail.test",
                                               instance="z"))).action == "DUNNO"
    [(_, entry)] = await store.entries(10, "late@")
    assert entry.passed and entry.last_seen == clock()
    engine.close()


async def test_whitelists_skip_greylisting(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(
        dns,
        clock,
        spf_enabled=False,
        greylist_whitelist_clients="remote.test",
        greylist_whitelist_recipients="postmaster@",
    )
    assert (await engine.evaluate(rcpt_request())).action == "DUNNO"
    other = rcpt_request(client_name="unknown", recipient="postmaster@secumail.test")
    assert (await engine.evaluate(other)).action == "DUNNO"
    assert (await engine.evaluate(rcpt_request(client_name="unknown"))).kind == "defer"


async def test_spf_fail_is_rejected_with_550(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock)
    decision = await engine.evaluate(rcpt_request(sender="ceo@forged.test"))
    assert decision.action.startswith("550 5.7.23 SPF check failed")
    assert decision.check == "spf" and decision.kind == "reject"


async def test_spf_fail_passes_on_when_not_rejecting(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock, spf_reject_fail=False, greylist_enabled=False)
    decision = await engine.evaluate(rcpt_request(sender="ceo@forged.test"))
    assert decision.action == "DUNNO"
    data = await engine.evaluate(rcpt_request(protocol_state="DATA", sender="ceo@forged.test"))
    assert data.action.startswith("PREPEND Received-SPF: fail (")


async def test_received_spf_header_at_data_stage(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock, greylist_enabled=False)
    assert (await engine.evaluate(rcpt_request(instance="x"))).action == "DUNNO"
    lookups = len(dns.queries)
    data = await engine.evaluate(rcpt_request(instance="x", protocol_state="DATA", recipient=""))
    assert data.action.startswith("PREPEND Received-SPF: pass (mx.secumail.test: domain of ")
    assert "client-ip=203.0.113.7;" in data.action
    assert 'envelope-from="alice@remote.test";' in data.action
    assert data.action.endswith("identity=mailfrom")
    assert len(dns.queries) == lookups  # the RCPT-time result was reused


async def test_null_sender_checks_the_helo_identity(dns: FakeResolver, clock: FakeClock) -> None:
    dns.add("mail.remote.test", "TXT", '"v=spf1 -all"')
    engine = make_engine(dns, clock, greylist_enabled=False)
    decision = await engine.evaluate(rcpt_request(sender=""))
    assert decision.action.startswith("550 5.7.23")
    data = await engine.evaluate(rcpt_request(sender="", protocol_state="DATA"))
    assert "identity=helo" in data.action


async def test_spf_temperror_is_451(dns: FakeResolver, clock: FakeClock) -> None:
    dns.failing.add("slowdns.test")
    engine = make_engine(dns, clock, greylist_enabled=False)
    decision = await engine.evaluate(rcpt_request(sender="a@slowdns.test"))
    assert decision.action.startswith("451 4.7.24")


async def test_softfail_and_none_pass(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock, greylist_enabled=False)
    for sender in ("a@soft.test", "a@nospf.test"):
        assert (await engine.evaluate(rcpt_request(sender=sender))).action == "DUNNO"


async def test_dnsbl_weights_and_threshold(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(
        dns,
        clock,
        spf_enabled=False,
        greylist_enabled=False,
        dnsbl_zones="bl.test*2,weak.test*1,clean.test*5",
        dnsbl_threshold=3,
    )
    decision = await engine.evaluate(rcpt_request())
    assert decision.action == (
        "554 5.7.1 Service unavailable; client [203.0.113.7] blocked using bl.test, weak.test"
    )
    lenient = make_engine(
        dns,
        clock,
        spf_enabled=False,
        greylist_enabled=False,
        dnsbl_zones="bl.test*2",
        dnsbl_threshold=3,
    )
    assert (await lenient.evaluate(rcpt_request())).action == "DUNNO"
    assert (await engine.evaluate(rcpt_request(client_address="203.0.113.8"))).action == "DUNNO"


async def test_dns_failure_defers_or_skips_when_failing_open(
    dns: FakeResolver, clock: FakeClock
) -> None:
    dns.failing.add("bl.test")
    closed = make_engine(dns, clock, spf_enabled=False, dnsbl_zones="bl.test")
    errors: list[str] = []
    closed.on_check_error = errors.append
    decision = await closed.evaluate(rcpt_request())
    assert (decision.action, decision.check) == (TEMPORARY_FAILURE, "dnsbl")
    assert errors == ["dnsbl"]
    open_ = make_engine(dns, clock, spf_enabled=False, dnsbl_zones="bl.test", policy_fail_open=True)
    assert (await open_.evaluate(rcpt_request())).check == "greylist"  # went on to greylisting


async def test_store_failure_defers(dns: FakeResolver, clock: FakeClock) -> None:
    engine = make_engine(dns, clock, BrokenStore(":memory:"), spf_enabled=False)
    decision = await engine.evaluate(rcpt_request())
    assert (decision.action, decision.check) == (TEMPORARY_FAILURE, "greylist")
    open_ = make_engine(
        dns, clock, BrokenStore(":memory:"), spf_enabled=False, policy_fail_open=True
    )
    assert (await open_.evaluate(rcpt_request())).action == "DUNNO"


async def test_other_stages_are_left_alone(engine: PolicyEngine) -> None:
    for state in ("CONNECT", "HELO", "MAIL", "VRFY", "ETRN", ""):
        assert (await engine.evaluate(rcpt_request(protocol_state=state))).action == "DUNNO"


async def test_sqlite_store_counts_passes_and_starts_over_after_max_age() -> None:
    store = SqliteStore(":memory:", max_age=10000)
    for now in (10.0, 20.0, 3610.0, 3620.0, 7210.0):
        await store.count_pass("192.0.2.0/24", now)
    assert (await store.lookup("192.0.2.0/24", "-"))[0] == ClientRecord(3, 7210.0)
    await store.count_pass("192.0.2.0/24", 17211.0)
    assert (await store.lookup("192.0.2.0/24", "-"))[0] == ClientRecord(1, 17211.0)
    assert (await store.lookup("192.0.3.0/24", "-"))[0] is None
    await store.close()


async def test_a_never_passed_triplet_is_purged_when_its_retry_window_closes() -> None:
    """Issue 30: kept max_age (35 days) like a passed one, though a retry after the window
    starts over anyway."""
    store = SqliteStore(":memory:", max_age=10000, retry_window=100)
    await store.put("one-off", Triplet(0.0, 0.0))
    await store.put("retried", Triplet(0.0, 50.0))
    await store.put("passed", Triplet(0.0, 50.0, passed=True))
    assert await store.purge(99.0) == 0
    assert await store.purge(101.0) == 2
    assert (await store.lookup("-", "passed"))[1] == Triplet(0.0, 50.0, True)
    assert await store.purge(10051.0) == 1
    await store.close()


# --- selective greylisting ---------------------------------------------------------------

BOT = {"client_address": "198.51.100.23", "client_name": "unknown",
       "reverse_client_name": "unknown", "helo_name": "xk2j9q.invalid",
       "sender": "promo@nospf.test"}
PROVIDER = {"client_address": "203.0.113.7", "client_name": "mail.remote.test",
            "reverse_client_name": "mail.remote.test", "helo_name": "mail.remote.test",
            "sender": "alice@remote.test"}


def selective(dns: FakeResolver, clock: FakeClock, **overrides: Any) -> PolicyEngine:
    dns.add("mail.remote.test", "A", "203.0.113.7")
    return make_engine(dns, clock, greylist_mode="selective", **overrides)


async def test_default_weights_greylist_a_bot_and_pass_a_provider(
    dns: FakeResolver, clock: FakeClock
) -> None:
    engine = selective(dns, clock)
    scores: list[tuple[list[tuple[str, float]], bool]] = []
    engine.on_score = lambda found, grey: scores.append((found, grey))
    bot = await engine.evaluate(rcpt_request(**BOT))
    assert bot.kind == "defer" and bot.check == "greylist"
    assert bot.reason == ("new or too early triplet, "
                          "score 3 (no-rdns +2, helo-unresolved +1)")
    provider = await engine.evaluate(rcpt_request(**PROVIDER, instance="p1"))
    assert provider.kind == "prepend", provider
    assert provider.action.startswith("PREPEND X-Greylist: not delayed by SecuMail at "
                                      "mx.secumail.test, score -1 (spf-pass -1); ")
    assert provider.reason == "not greylisted, score -1 (spf-pass -1)"
    # The header once per transaction; the next recipient simply passes.
    second = await engine.evaluate(rcpt_request(**PROVIDER, instance="p1",
                                                recipient="carol@secumail.test"))
    assert second.action == "DUNNO"
    assert [grey for _, grey in scores] == [True, False, False]
    assert scores[0][0] == [("no-rdns", 2.0), ("helo-unresolved", 1.0)]


async def test_a_greylisted_bot_that_retries_gets_its_score_in_the_header(
    dns: FakeResolver, clock: FakeClock
) -> None:
    engine = selective(dns, clock)
    assert (await engine.evaluate(rcpt_request(**BOT))).kind == "defer"
    clock.advance(301)
    retry = await engine.evaluate(rcpt_request(**BOT, instance="retry"))
    assert retry.action.startswith("PREPEND X-Greylist: delayed 301 seconds by SecuMail at "
                                   "mx.secumail.test, score 3 (no-rdns +2, helo-unresolved +1); ")


async def test_each_signal(dns: FakeResolver, clock: FakeClock) -> None:
    dns.add("7.113.0.203.wl.test", "A", "127.0.10.2")
    dns.add("23.100.51.198.grey.test", "A", "127.0.0.2")
    engine = selective(
        dns, clock, spf_enabled=True, greylist_known_senders="bank.test",
        dnsbl_zones="grey.test*0.5", dnsbl_threshold=5, greylist_dnswl_zones="wl.test*-2",
    )
    found: list[list[tuple[str, float]]] = []
    engine.on_score = lambda signals, grey: found.append(signals)

    async def signals_of(**request: str) -> list[str]:
        await engine.evaluate(rcpt_request(**{**BOT, "instance": str(len(found)), **request}))
        return [name for name, _ in found[-1]]

    assert await signals_of() == ["no-rdns", "helo-unresolved", "dnsbl"]
    assert found[-1][-1] == ("dnsbl", 0.5)  # the zone's weight times the signal's
    assert await signals_of(reverse_client_name="mail.other.test") == [
        "rdns-mismatch", "helo-unresolved", "dnsbl"]
    assert "dynamic-rdns" in await signals_of(
        reverse_client_name="198-51-100-23.dsl.isp.test", client_name="x")
    assert "dynamic-rdns" in await signals_of(
        reverse_client_name="host23.pool.isp.test", client_name="x")
    assert await signals_of(helo_name="[198.51.100.23]") == ["no-rdns", "helo-ip", "dnsbl"]
    dns.add("mail.bank.test", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')
    assert {"spf-pass", "known-sender"} <= set(await signals_of(sender="alerts@mail.bank.test"))
    assert "known-sender" not in await signals_of(sender="alerts@bank.test")  # SPF none
    provider = await signals_of(**PROVIDER)
    assert provider == ["dnswl", "spf-pass"] and found[-1][0] == ("dnswl", -2.0)


async def test_a_network_that_passed_before_scores_lower(
    dns: FakeResolver, clock: FakeClock
) -> None:
    engine = selective(dns, clock, greylist_signals="no-rdns=2, passed-before=-1")
    near_bot = {**BOT, "helo_name": "mail.remote.test"}  # no rDNS only: 2, greylisted
    assert (await engine.evaluate(rcpt_request(**near_bot))).kind == "defer"
    clock.advance(301)
    assert (await engine.evaluate(rcpt_request(**near_bot, instance="r"))).kind == "prepend"
    later = await engine.evaluate(rcpt_request(**near_bot, instance="n",
                                               recipient="new@secumail.test"))
    assert later.reason == "not greylisted, score 1 (no-rdns +2, passed-before -1)"


async def test_weights_switch_signals_off(dns: FakeResolver, clock: FakeClock) -> None:
    engine = selective(dns, clock, greylist_signals="helo-unresolved=0, no-rdns=1")
    decision = await engine.evaluate(rcpt_request(**BOT))
    assert decision.reason == "not greylisted, score 1 (no-rdns +1)"
    assert ("xk2j9q.invalid", "A") not in dns.queries  # a signal that is off asks nothing


async def test_all_mode_greylists_a_provider_too(dns: FakeResolver, clock: FakeClock) -> None:
    dns.add("mail.remote.test", "A", "203.0.113.7")
    engine = make_engine(dns, clock, greylist_mode="all")
    decision = await engine.evaluate(rcpt_request(**PROVIDER))
    assert decision.kind == "defer" and decision.reason == "new or too early triplet"
    assert not [q for q in dns.queries if q[0] == "mail.remote.test" and q[1] == "A"]


async def test_signal_dns_failure_defers_or_leaves_the_signal_out(
    dns: FakeResolver, clock: FakeClock
) -> None:
    dns.failing.add("slow.test")
    bot = {**BOT, "helo_name": "mx.slow.test"}
    closed = selective(dns, clock)
    decision = await closed.evaluate(rcpt_request(**bot))
    assert decision.action == TEMPORARY_FAILURE and decision.check == "greylist"
    opened = selective(dns, clock, policy_fail_open=True)
    decision = await opened.evaluate(rcpt_request(**bot))
    assert decision.kind == "defer" and decision.reason.endswith("score 2 (no-rdns +2)")


async def test_a_dnsbl_rejection_still_comes_first(
    dns: FakeResolver, clock: FakeClock
) -> None:
    dns.add("23.100.51.198.bl.test", "A", "127.0.0.2")
    engine = selective(dns, clock, dnsbl_zones="bl.test")
    decision = await engine.evaluate(rcpt_request(**BOT))
    assert decision.check == "dnsbl" and decision.kind == "reject"
