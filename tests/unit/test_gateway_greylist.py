"""The greylist administration the gateway relies on: whitelist entries added at run time
(validated, stored, honoured by the engine within its refresh interval), listing and
deleting triplets. SQLite in memory, a fake clock and fake DNS: no sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from secumail.greylist_store import SqliteStore, Triplet, WhitelistEntry, normalize_whitelist_entry
from secumail.settings import Settings
from services.policy.engine import PolicyEngine
from testkit.fakes import FakeAsyncResolver, FakeClock, FakeResolver
from testkit.policy_client import rcpt_request


def rcpt(client: str, sender: str, recipient: str) -> dict[str, str]:
    return rcpt_request(client_address=client, sender=sender, recipient=recipient)


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("client", "192.0.2.7", "192.0.2.7/32"),
        ("client", "192.0.2.0/24", "192.0.2.0/24"),
        ("client", "[2001:db8::]/64", "2001:db8::/64"),
        ("client", "Mail.Partner.Example.", "mail.partner.example"),
        ("client", "*.partner.example", "partner.example"),
        ("recipient", "Abuse@Example.org", "abuse@example.org"),
        ("recipient", "postmaster@", "postmaster@"),
        ("recipient", "example.org", "example.org"),
    ],
)
def test_whitelist_entries_are_normalized(kind: str, value: str, expected: str) -> None:
    assert normalize_whitelist_entry(kind, value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("client", ""),
        ("client", "not a host"),
        ("client", "192.0.2.0/33"),
        ("recipient", "@example.org"),
        ("recipient", "user@localhost"),
        ("recipient", "a b@example.org"),
        ("recipient", "bare"),
    ],
)
def test_bad_whitelist_entries_are_refused(kind: str, value: str) -> None:
    with pytest.raises(ValueError, match="not an"):
        normalize_whitelist_entry(kind, value)  # type: ignore[arg-type]


async def test_sqlite_store_lists_matches_and_deletes_triplets() -> None:
    store = SqliteStore(":memory:")
    await store.put("192.0.2.0/24/a@remote.test/bob@example.org", Triplet(1.0, 5.0))
    await store.put("192.0.2.0/24/c_d@remote.test/bob@example.org", Triplet(2.0, 9.0, True))
    assert [k for k, _ in await store.entries(10)] == [
        "192.0.2.0/24/c_d@remote.test/bob@example.org",  # most recently seen first
        "192.0.2.0/24/a@remote.test/bob@example.org",
    ]
    assert len(await store.entries(1)) == 1
    # `_` is a literal underscore in the filter, not SQL's one-character wildcard.
    assert [k for k, _ in await store.entries(10, "c_d@")] == [
        "192.0.2.0/24/c_d@remote.test/bob@example.org"
    ]
    assert await store.entries(10, "a_") == []
    assert await store.delete("192.0.2.0/24/a@remote.test/bob@example.org")
    assert not await store.delete("192.0.2.0/24/a@remote.test/bob@example.org")
    assert await store.count() == 1
    await store.close()


async def test_sqlite_store_keeps_whitelist_entries_once() -> None:
    store = SqliteStore(":memory:")
    entry = WhitelistEntry("client", "192.0.2.0/24", 10.0)
    assert await store.add_whitelist(entry)
    assert not await store.add_whitelist(WhitelistEntry("client", "192.0.2.0/24", 20.0))
    await store.add_whitelist(WhitelistEntry("recipient", "abuse@", 30.0))
    assert await store.whitelist() == [entry, WhitelistEntry("recipient", "abuse@", 30.0)]
    assert await store.remove_whitelist("client", "192.0.2.0/24")
    assert not await store.remove_whitelist("client", "192.0.2.0/24")
    assert [e.value for e in await store.whitelist()] == ["abuse@"]
    await store.close()


async def test_admin_writes_are_visible_to_another_connection_at_once(tmp_path: object) -> None:
    """The gateway and the policy service open the same file: no batching delay for admin."""
    path = f"{tmp_path}/greylist.sqlite"
    policy_side, gateway_side = SqliteStore(path), SqliteStore(path)
    await gateway_side.add_whitelist(WhitelistEntry("recipient", "abuse@", 1.0))
    assert [e.value for e in await policy_side.whitelist()] == ["abuse@"]
    await policy_side.close()
    await gateway_side.close()


@pytest.fixture
async def engine() -> AsyncIterator[tuple[PolicyEngine, SqliteStore, FakeClock]]:
    clock, store = FakeClock(), SqliteStore(":memory:")
    settings = Settings(hostname="mx.secumail.test", spf_enabled=False,
                        probe_mailbox="canary@example.org")
    dns = FakeAsyncResolver()
    engine = PolicyEngine(settings, store, FakeResolver(), dns, clock)  # type: ignore[arg-type]
    yield engine, store, clock
    engine.close()
    await store.close()


async def test_runtime_whitelist_is_honoured_within_the_refresh_interval(
    engine: tuple[PolicyEngine, SqliteStore, FakeClock],
) -> None:
    policy, store, clock = engine
    first = await policy.evaluate(rcpt("203.0.113.7", "a@remote.test", "bob@example.org"))
    assert first.check == "greylist"
    await store.add_whitelist(WhitelistEntry("client", "203.0.113.0/24", clock.now))
    clock.advance(PolicyEngine.WHITELIST_REFRESH)
    again = await policy.evaluate(rcpt("203.0.113.8", "z@remote.test", "bob@example.org"))
    assert again.action == "DUNNO"
    await store.remove_whitelist("client", "203.0.113.0/24")
    await store.add_whitelist(WhitelistEntry("recipient", "carol@example.org", clock.now))
    clock.advance(PolicyEngine.WHITELIST_REFRESH)
    other = await policy.evaluate(rcpt("203.0.113.9", "y@remote.test", "bob@example.org"))
    assert other.check == "greylist"
    carol = await policy.evaluate(rcpt("203.0.113.9", "y@remote.test", "carol@example.org"))
    assert carol.action == "DUNNO"


async def test_the_probe_mailbox_is_never_greylisted(
    engine: tuple[PolicyEngine, SqliteStore, FakeClock],
) -> None:
    policy, _, _ = engine
    decision = await policy.evaluate(rcpt("198.51.100.1", "", "canary@example.org"))
    assert decision.action == "DUNNO"
    other = await policy.evaluate(rcpt("198.51.100.1", "", "bob@example.org"))
    assert other.check == "greylist"


@pytest.mark.parametrize(("triplet", "state"), [
    (Triplet(1000.0, 1000.0, passed=True), "passed"),
    (Triplet(1000.0, 1000.0), "waiting"),  # 100 s after, the delay is 300
    (Triplet(700.0, 700.0), "may retry"),
    (Triplet(1100.0 - 2 * 86400 - 1, 1000.0), "retry window closed"),
])
def test_each_triplet_says_what_its_next_attempt_meets(triplet: Triplet, state: str) -> None:
    assert triplet.state(1100.0, delay=300, retry_window=2 * 86400) == state
