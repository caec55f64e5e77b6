"""The greylist store on Redis (the one scaled policy replicas share), against a real
redis-server: the administration gives the same answers as SQLite's
(tests/unit/test_gateway_greylist.py), and replicas counting at once lose no count."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.exceptions

from secumail.greylist_store import RedisStore, Triplet, WhitelistEntry


async def test_redis_store_lists_matches_and_deletes_triplets(redis_url: str) -> None:
    store = RedisStore(redis_url, max_age=3600)
    await store.put("192.0.2.0/24/a@remote.test/bob@example.org", Triplet(1.0, 5.0))
    await store.put("192.0.2.0/24/c*d@remote.test/bob@example.org", Triplet(2.0, 9.0, True))
    entries = await store.entries(10)
    assert [k for k, _ in entries] == [
        "192.0.2.0/24/c*d@remote.test/bob@example.org",  # most recently seen first
        "192.0.2.0/24/a@remote.test/bob@example.org",
    ]
    assert entries[0][1] == Triplet(2.0, 9.0, True)
    # `*` is a literal star in the filter, not Redis's glob.
    assert [k for k, _ in await store.entries(10, "c*d@")] == [
        "192.0.2.0/24/c*d@remote.test/bob@example.org"]
    assert await store.entries(10, "a*@") == []
    assert len(await store.entries(1)) == 1
    assert await store.delete("192.0.2.0/24/a@remote.test/bob@example.org")
    assert not await store.delete("192.0.2.0/24/a@remote.test/bob@example.org")
    assert await store.count() == 1
    await store.close()


async def test_redis_store_keeps_whitelist_entries_once(redis_url: str) -> None:
    store = RedisStore(redis_url, max_age=3600)
    entry = WhitelistEntry("client", "2001:db8::/64", 10.0)
    assert await store.add_whitelist(entry)
    assert not await store.add_whitelist(WhitelistEntry("client", "2001:db8::/64", 20.0))
    await store.add_whitelist(WhitelistEntry("recipient", "abuse@", 30.0))
    assert await store.whitelist() == [entry, WhitelistEntry("recipient", "abuse@", 30.0)]
    other = RedisStore(redis_url, max_age=3600)  # another replica sees the same entries
    assert await other.remove_whitelist("client", "2001:db8::/64")
    assert not await store.remove_whitelist("client", "2001:db8::/64")
    assert [e.value for e in await store.whitelist()] == ["abuse@"]
    await store.close()
    await other.close()


async def test_replicas_passing_one_network_at_once_count_it_once(redis_url: str) -> None:
    """The auto-whitelist's count, one an hour: replicas passing one network at the same time
    count it once, not once each (each replica's read-then-write would count several)."""
    replicas = [RedisStore(redis_url, max_age=7200) for _ in range(2)]
    network = "198.51.100.0/24"
    await asyncio.gather(
        *(replicas[n % 2].count_pass(network, 1000.0 + n) for n in range(40))
    )
    client, _ = await replicas[0].lookup(network, "no-such-triplet")
    assert client is not None and client.passes == 1
    await asyncio.gather(*(store.count_pass(network, 4700.0) for store in replicas))
    client, _ = await replicas[1].lookup(network, "no-such-triplet")
    assert client is not None and (client.passes, client.last_seen) == (2, 4700.0)
    assert await replicas[0].redis.ttl(RedisStore.PREFIX + "c:" + network) > 7000
    for store in replicas:
        await store.close()


async def test_redis_password_is_read_from_its_file_at_each_connection(
    redis_with_password: tuple[str, str], tmp_path: Path
) -> None:
    """Issue 13, item 9: compose's Redis requires a password, which it writes to the
    redis-auth volume at its first start, maybe after the policy service started."""
    url, password = redis_with_password
    password_file = tmp_path / "password"
    store = RedisStore(url, max_age=3600, password_file=str(password_file))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await store.count()  # no file yet: no password sent, Redis refuses
    password_file.write_text(password + "\n")
    assert await store.count() == 0  # the next connection reads it
    await store.close()
    wrong = RedisStore(url.replace("redis://", "redis://:wrong@"), 3600,
                       password_file=str(password_file))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await wrong.count()  # a password in the URL wins over the file
    await wrong.close()

