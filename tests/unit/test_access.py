"""Who may use a filter: networks, and names resolved to every replica's address."""

from __future__ import annotations

import asyncio

import pytest

from secumail.access import AllowedClients, split_entries


class Names:
    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {"postfix": ["172.29.125.2"]}
        self.asked = 0
        self.now = 100.0

    async def resolve(self, name: str) -> list[str]:
        self.asked += 1
        if name not in self.table:
            raise OSError(f"{name}: Name or service not known")
        return self.table[name]


async def test_networks_loopback_and_names() -> None:
    names = Names()
    clients = AllowedClients(["192.0.2.0/24", "postfix", "gateway"], names.resolve,
                             clock=lambda: names.now)
    assert await clients.allows("192.0.2.77")
    assert await clients.allows("127.0.0.1") and await clients.allows("::1")
    assert not await clients.allows("127.0.0.2")  # loopback is this host only: 127.0.0.1
    assert await clients.allows("172.29.125.2")  # postfix; gateway does not resolve: skipped
    assert await clients.allows("::ffff:172.29.125.2")
    assert not await clients.allows("172.29.125.9")
    assert not await clients.allows("unknown") and not await clients.allows("")


async def test_a_new_replica_is_let_in_after_a_short_while() -> None:
    names = Names()
    clients = AllowedClients(["postfix"], names.resolve, clock=lambda: names.now)
    assert await clients.allows("172.29.125.2")
    names.table["postfix"] = ["172.29.125.2", "172.29.125.3"]
    assert not await clients.allows("172.29.125.3")  # asked again a moment ago: not yet
    asked = names.asked
    assert not await clients.allows("172.29.125.4")
    assert names.asked == asked  # an unknown address does not make a lookup storm
    names.now += AllowedClients.MISS_REFRESH
    assert await clients.allows("172.29.125.3")
    names.table["postfix"] = ["172.29.125.3"]  # the first replica went away
    names.now += AllowedClients.REFRESH
    assert not await clients.allows("172.29.125.2")


@pytest.mark.parametrize("entry", ["not a name", "a..b", "x" * 64 + ".test", "10.0.0.0/33"])
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not an IP address, network or host name"):
        split_entries([entry])


def test_entries_split_into_networks_and_names() -> None:
    networks, names = split_entries(["10.0.0.0/8", "[2001:db8::]/32", "Postfix.", "clamav"])
    assert [str(n) for n in networks] == ["10.0.0.0/8", "2001:db8::/32"]
    assert names == ["postfix", "clamav"]


async def test_connections_waiting_for_the_same_lookup_all_get_its_answer() -> None:
    """Every connection that came while the names were being resolved waits for that one
    lookup; the first to go on cleared it, and the others then failed (AttributeError on
    None): a filter left them without a greeting until its 300 s idle timeout (seen in CI:
    7 of 20 junk connections to the spamd filter open after 60 s)."""
    names = Names()
    release = asyncio.Event()

    async def slow(name: str) -> list[str]:
        await release.wait()
        return await names.resolve(name)

    clients = AllowedClients(["postfix"], slow, clock=lambda: names.now)
    waiting = [asyncio.ensure_future(clients.allows(address))
               for address in ("172.29.125.2", "172.29.125.2", "172.29.125.9", "172.29.125.2")]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [True, True, False, True]
    names.now += AllowedClients.REFRESH  # and the next lookup is made, once
    release.clear()
    waiting = [asyncio.ensure_future(clients.allows("172.29.125.2")) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [True, True, True]
    assert names.asked == 2
