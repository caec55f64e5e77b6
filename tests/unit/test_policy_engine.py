"""The policy engine end to end without sockets: fake DNS, fake clock, in-memory SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from secumail.settings import Settings
from services.policy.engine import TEMPORARY_FAILURE, PolicyEngine
from services.policy.greylist import ClientRecord
from services.policy.stores import SqliteStore
from tests.support.fakes import FakeAsyncResolver, FakeClock, FakeResolver
from tests.support.policy_client import rcpt_request


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
    settings = Settings(hostname="mx.secumail.test", **overrides)
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
    authenticated = await engine.evaluate(rcpt_request(sasl_username="alice"))
    assert (authenticated.action, authenticated.check) == ("DUNNO", "trusted")


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
