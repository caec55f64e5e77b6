"""Where the outbound counters and held subjects live (secumail/outbound.py decides).

Beside the greylist, in the same store: Redis (shared by policy replicas; one Lua script moves
a request's buckets atomically, on Redis's own clock, since replicas' clocks differ) or the
SQLite file (one process; nothing awaited between reading and writing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol, cast

import redis.asyncio as aioredis

from secumail.greylist_store import (
    GreylistStore,
    RedisStore,
    SqliteStore,
    glob_escape,
    like_escape,
)
from secumail.outbound import Bucket, Charged, Held, gcra


class OutboundStore(Protocol):
    async def charge(self, limits: list[Bucket], attempts: list[Bucket],
                     held: list[str]) -> Charged:
        """Atomically: move every attempt bucket (capped at its period: tries go on being
        counted while refused); then, unless one of `held` is held, move every limit
        bucket if all fit, or none."""
        ...

    async def hold(self, held: Held) -> bool:
        """Hold a subject; False when it was held already (so the admin is told once)."""
        ...

    async def holds(self) -> list[Held]: ...

    async def release(self, subject: str) -> bool:
        """Release a held subject and forget its tries (else the next one holds it again)."""
        ...

    async def mark_notified(self, subject: str) -> None: ...

    async def purge(self, now: float) -> None: ...


def _held_json(held: Held) -> str:
    return json.dumps({"since": held.since, "reason": held.reason, "notified": held.notified})


def _held_from(subject: str, text: str) -> Held:
    data = json.loads(text)
    return Held(subject, float(data["since"]), str(data["reason"]), bool(data["notified"]))


class RedisOutbound:
    """Counters shared by every policy replica, moved by one script (atomic) on Redis's
    clock (replicas' clocks differ)."""

    PREFIX = "secumail:outbound:"
    HELD = PREFIX + "held"
    # KEYS: the held hash, then the attempt buckets, then the limit buckets.
    # ARGV: the number of attempt buckets, the number of held subjects, the subjects, then
    # interval and period per bucket (attempts first). Returns {state, index, overflowed...}:
    # state 0 counted, 1 held (index: the subject), 2 over (index: the limit bucket).
    CHARGE = """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
        local nattempts, nheld = tonumber(ARGV[1]), tonumber(ARGV[2])
        local args = 2 + nheld
        local function step(key, i)
            local interval = tonumber(ARGV[args + 2 * i - 1])
            local period = tonumber(ARGV[args + 2 * i])
            local tat = tonumber(redis.call('GET', key) or '0')
            if tat < now then tat = now end
            return tat + interval, period
        end
        local result = {0, 0}
        for i = 1, nattempts do
            local new, period = step(KEYS[1 + i], i)
            if new - now > period + 1e-9 then
                result[#result + 1] = i
                new = now + period
            end
            redis.call('SET', KEYS[1 + i], tostring(new), 'PX',
                       math.ceil((new - now) * 1000) + 1000)
        end
        for i = 1, nheld do
            if redis.call('HEXISTS', KEYS[1], ARGV[2 + i]) == 1 then
                result[1], result[2] = 1, i
                return result
            end
        end
        local news = {}
        for j = 1, #KEYS - 1 - nattempts do
            local new, period = step(KEYS[1 + nattempts + j], nattempts + j)
            if new - now > period + 1e-9 then
                result[1], result[2] = 2, j
                return result
            end
            news[j] = new
        end
        for j, new in ipairs(news) do
            redis.call('SET', KEYS[1 + nattempts + j], tostring(new), 'PX',
                       math.ceil((new - now) * 1000) + 1000)
        end
        return result
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._charge = redis.register_script(self.CHARGE)

    async def charge(self, limits: list[Bucket], attempts: list[Bucket],
                     held: list[str]) -> Charged:
        keys = [self.HELD, *(self.PREFIX + b.key for b in (*attempts, *limits))]
        args: list[str | int | float] = [len(attempts), len(held), *held]
        for bucket in (*attempts, *limits):
            args += [repr(bucket.interval), bucket.period]
        state, index, *overflowed = await self._charge(keys=keys, args=args)
        return Charged(held[index - 1] if state == 1 else None,
                       limits[index - 1] if state == 2 else None,
                       [attempts[i - 1] for i in overflowed])

    async def hold(self, held: Held) -> bool:
        return bool(await self.redis.hsetnx(self.HELD, held.subject, _held_json(held)))

    async def holds(self) -> list[Held]:
        data = cast(dict[str, str], await self.redis.hgetall(self.HELD))
        return sorted((_held_from(s, t) for s, t in data.items()), key=lambda h: h.since)

    async def release(self, subject: str) -> bool:
        removed = bool(await self.redis.hdel(self.HELD, subject))
        scope, _, value = subject.partition(":")
        pattern = f"{self.PREFIX}a:{scope}:*:{glob_escape(value)}"
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            await self.redis.delete(key)
        return removed

    async def mark_notified(self, subject: str) -> None:
        text = cast(str | None, await self.redis.hget(self.HELD, subject))
        if text is not None:
            held = _held_from(subject, text)
            await self.redis.hset(self.HELD, subject, _held_json(
                Held(held.subject, held.since, held.reason, True)))

    async def purge(self, now: float) -> None:
        return None  # buckets carry their own expiry


class SqliteOutbound:
    """The counters of one policy replica, in its greylist SQLite file, written in the
    store's batched transaction."""

    def __init__(self, store: SqliteStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        store.db.execute("CREATE TABLE IF NOT EXISTS outbound_buckets (key TEXT PRIMARY KEY, "
                         "tat REAL) WITHOUT ROWID")
        store.db.execute("CREATE TABLE IF NOT EXISTS outbound_held (subject TEXT PRIMARY KEY, "
                         "since REAL, reason TEXT, notified INTEGER) WITHOUT ROWID")

    def _tats(self, buckets: list[Bucket]) -> dict[str, float]:
        keys = [bucket.key for bucket in buckets]
        marks = ",".join("?" * len(keys))
        return dict(self.store.db.execute(
            f"SELECT key, tat FROM outbound_buckets WHERE key IN ({marks})", keys).fetchall())

    async def charge(self, limits: list[Bucket], attempts: list[Bucket],
                     held: list[str]) -> Charged:
        # Nothing awaited from here to the end: no other request of this process interleaves.
        now = self.clock()
        tats = self._tats([*attempts, *limits])
        overflowed, moved = [], []
        for bucket in attempts:
            fits, new = gcra(tats.get(bucket.key), now, bucket.interval, bucket.period)
            if not fits:
                overflowed.append(bucket)
                new = now + bucket.period
            moved.append((bucket.key, new))
        marks = ",".join("?" * len(held))
        found = self.store.db.execute(
            f"SELECT subject FROM outbound_held WHERE subject IN ({marks})", held).fetchone()
        over = None
        if found is None:
            counted = []
            for bucket in limits:
                fits, new = gcra(tats.get(bucket.key), now, bucket.interval, bucket.period)
                if not fits:
                    over = bucket
                    break
                counted.append((bucket.key, new))
            else:
                moved += counted
        if moved:
            self.store.write_many("INSERT OR REPLACE INTO outbound_buckets VALUES (?, ?)", moved)
        return Charged(found[0] if found else None, over, overflowed)

    async def hold(self, held: Held) -> bool:
        return self.store.write_now(
            "INSERT OR IGNORE INTO outbound_held VALUES (?, ?, ?, ?)",
            (held.subject, held.since, held.reason, int(held.notified))) > 0

    async def holds(self) -> list[Held]:
        rows = self.store.db.execute(
            "SELECT subject, since, reason, notified FROM outbound_held ORDER BY since")
        return [Held(s, float(t), r, bool(n)) for s, t, r, n in rows.fetchall()]

    async def release(self, subject: str) -> bool:
        scope, _, value = subject.partition(":")
        self.store.write_now(
            "DELETE FROM outbound_buckets WHERE key LIKE ? ESCAPE '\\' AND key LIKE ? "
            "ESCAPE '\\'", (like_escape(f"a:{scope}:") + "%",
                            "%" + like_escape(f":{value}")))
        return self.store.write_now("DELETE FROM outbound_held WHERE subject = ?",
                                    (subject,)) > 0

    async def mark_notified(self, subject: str) -> None:
        self.store.write_now("UPDATE outbound_held SET notified = 1 WHERE subject = ?",
                             (subject,))

    async def purge(self, now: float) -> None:
        # A bucket whose time has passed is empty: the same as no row.
        self.store.write("DELETE FROM outbound_buckets WHERE tat < ?", (now,))


def outbound_store(store: GreylistStore) -> OutboundStore:
    """The outbound counters beside the greylist, in the same Redis or SQLite file."""
    if isinstance(store, RedisStore):
        return RedisOutbound(store.redis)
    if isinstance(store, SqliteStore):
        return SqliteOutbound(store)
    raise TypeError(f"no outbound counters for {type(store).__name__}")
