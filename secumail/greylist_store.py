"""The greylist's state: what it holds, in which form, and where it lives.

The policy service decides (services/policy/greylist.py) and keeps its triplets and client
records here; the gateway's admin API lists and removes triplets and adds whitelist entries
through the same store. What both read and write is defined once, in this module: the
records (`Triplet`, `ClientRecord`, `WhitelistEntry`), a triplet's key, the canonical form
of a whitelist entry, and how a pass counts towards the auto-whitelist.

The store is SQLite (embedded default) or Redis (shared by replicas); both speak the same
small async interface. Errors propagate as exceptions: the policy engine turns them into a
clear DEFER_IF_PERMIT (or DUNNO when failing open), the gateway into a 503.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, cast
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.credentials import CredentialProvider

from secumail.netaddr import parse_network

# How long a triplet counts, unless the settings say otherwise (SECUMAIL_GREYLIST_MAX_AGE,
# SECUMAIL_GREYLIST_RETRY_WINDOW): a passed one after it was last seen, one never passed
# after it was first seen.
MAX_AGE = 35 * 86400
RETRY_WINDOW = 2 * 86400


@dataclass(frozen=True)
class Triplet:
    """What the store remembers about one (network, sender, recipient)."""

    first_seen: float
    last_seen: float
    passed: bool = False

    def state(self, now: float, delay: float, retry_window: float) -> str:
        """What it means for its next attempt, in words for the admin's list: passed, waiting
        (a retry now is deferred), may retry (one now passes), or retry window closed (it was
        never retried in time: greylisted anew)."""
        if self.passed:
            return "passed"
        waited = now - self.first_seen
        if waited > retry_window:
            return "retry window closed"
        return "waiting" if waited < delay else "may retry"


@dataclass(frozen=True)
class ClientRecord:
    """How many triplets a client network has got through greylisting (auto-whitelist)."""

    passes: int
    last_seen: float


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store's key of a triplet: `network/sender/recipient`, `network` the client's
    from `client_network()`. (A string, built on every request: TripletKey reads it back.)"""
    return f"{network}/{(sender or '<>').lower()}/{recipient.lower()}"


@dataclass(frozen=True)
class TripletKey:
    network: str
    sender: str  # "<>" for the null sender
    recipient: str

    @classmethod
    def from_text(cls, key: str) -> TripletKey:
        """The parts of `triplet_key()`'s text; the network itself holds a slash."""
        address, _, prefix_rest = key.partition("/")
        prefix, _, rest = prefix_rest.partition("/")
        sender, _, recipient = rest.rpartition("/")
        return cls(f"{address}/{prefix}", sender, recipient)

    @property
    def text(self) -> str:
        return triplet_key(self.network, self.sender, self.recipient)


# postgrey counts a client's passes at most once an hour ("record only one attempt per hour"):
# one session with many recipients, or a burst of retries, is one pass, not a whitelisting.
AWL_COUNT_INTERVAL = 3600


def record_pass(record: ClientRecord | None, now: float, max_age: float) -> ClientRecord | None:
    """The client network's record once one more of its triplets got through, or None when
    this pass does not count (its last counted pass was less than an hour ago). A record
    older than `max_age` starts over. Kept counting once whitelisted, to keep it fresh."""
    if record is None or now - record.last_seen > max_age:
        return ClientRecord(1, now)
    if abs(now - record.last_seen) < AWL_COUNT_INTERVAL:  # either way: replicas' clocks differ
        return None
    return ClientRecord(record.passes + 1, now)


# --- whitelist entries added at run time (the gateway's admin API) --------------------------

WhitelistKind = Literal["client", "recipient"]
_LABELS = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]"
                     r"([a-z0-9_-]{0,61}[a-z0-9])?)*$")
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


@dataclass(frozen=True)
class WhitelistEntry:
    kind: WhitelistKind
    value: str
    added: float


def normalize_whitelist_entry(kind: WhitelistKind, value: str) -> str:
    """The canonical text of a whitelist entry, in the forms the settings' whitelists take;
    ValueError naming the entry otherwise."""
    value = value.strip().lower()
    if kind == "client":
        try:
            return str(parse_network(value))
        except ValueError:
            name = value.rstrip(".").removeprefix("*.")
            if _LABELS.match(name):
                return name
        raise ValueError(f"not an IP address, network, host or domain name: {value!r}")
    local, at, domain = value.rpartition("@")
    domain = domain.rstrip(".")
    if at and not domain and _LOCAL.match(local):
        return value  # `postmaster@`: that local part in every domain
    if at and _LOCAL.match(local) and _LABELS.match(domain) and "." in domain:
        return f"{local}@{domain}"
    if not at and _LABELS.match(domain) and "." in domain:
        return domain
    raise ValueError(f"not an address, `local@` or a domain: {value!r}")


def like_escape(text: str) -> str:
    """`text` taken literally in a SQL LIKE pattern (with ESCAPE '\\')."""
    return re.sub(r"([%_\\])", r"\\\1", text)


def glob_escape(text: str) -> str:
    """`text` taken literally in a Redis SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# --- the stores -----------------------------------------------------------------------------


class GreylistStore(Protocol):
    async def lookup(self, network: str, key: str) -> tuple[ClientRecord | None, Triplet | None]:
        """The client network's record and the triplet's entry, in one round trip."""
        ...

    async def put(self, key: str, entry: Triplet) -> None: ...

    async def count_pass(self, network: str, now: float) -> None:
        """One more triplet of the client network got through: counted as `record_pass`
        says (the auto-whitelist's count, at most one an hour). Atomic: replicas sharing a
        store may count passes of the same network at once."""
        ...

    async def purge(self, now: float) -> int:
        """Forget what no longer counts (see `lifetime`): the number of triplets removed."""
        ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...

    # Administration (the gateway): listing and removing triplets, and whitelist entries
    # added at run time, which the engine reads back every few seconds.
    async def entries(self, limit: int, match: str = "") -> list[tuple[str, Triplet]]: ...

    async def delete(self, key: str) -> bool: ...

    async def whitelist(self) -> list[WhitelistEntry]: ...

    async def add_whitelist(self, entry: WhitelistEntry) -> bool: ...

    async def remove_whitelist(self, kind: WhitelistKind, value: str) -> bool: ...


class SqliteStore:
    """One file, WAL journal, writes grouped into one transaction per `COMMIT_INTERVAL`.

    A commit per request would cost more than everything else a request does. A crash loses
    at most the last interval of updates, which only means a few triplets greylisted again.
    """

    COMMIT_INTERVAL = 0.1

    def __init__(self, path: str, max_age: int = MAX_AGE,
                 retry_window: int = RETRY_WINDOW) -> None:
        self.max_age = max_age
        self.retry_window = retry_window
        self._commit_timer: asyncio.TimerHandle | None = None
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS triplets (key TEXT PRIMARY KEY, first_seen REAL, "
            "last_seen REAL, passed INTEGER) WITHOUT ROWID"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS clients (network TEXT PRIMARY KEY, passes INTEGER, "
            "last_seen REAL) WITHOUT ROWID"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS whitelist (kind TEXT, value TEXT, added REAL, "
            "PRIMARY KEY (kind, value)) WITHOUT ROWID"
        )

    async def lookup(self, network: str, key: str) -> tuple[ClientRecord | None, Triplet | None]:
        passes, seen, first, last, passed = self.db.execute(
            "SELECT c.passes, c.last_seen, t.first_seen, t.last_seen, t.passed "
            "FROM (SELECT ? AS network, ? AS key) AS q "
            "LEFT JOIN clients AS c ON c.network = q.network "
            "LEFT JOIN triplets AS t ON t.key = q.key", (network, key),
        ).fetchone()
        client = ClientRecord(passes, seen) if passes is not None else None
        return client, Triplet(first, last, bool(passed)) if first is not None else None

    def write(self, sql: str, values: tuple[object, ...]) -> None:
        """A write joined to the batch committed within COMMIT_INTERVAL."""
        self.write_many(sql, (values,))

    def write_many(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        """Writes joined to the batch (the outbound counters, secumail/outbound_store.py,
        write theirs here too)."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN")
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.COMMIT_INTERVAL, self._commit
            )
        self.db.executemany(sql, rows)

    def _commit(self) -> None:
        self._commit_timer = None
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def write_now(self, sql: str, values: tuple[object, ...]) -> int:
        """An administrative change, committed at once (not batched): rows changed."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        self._commit()
        return int(self.db.execute(sql, values).rowcount)

    async def put(self, key: str, entry: Triplet) -> None:
        self.write(
            "INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?)",
            (key, entry.first_seen, entry.last_seen, int(entry.passed)),
        )

    async def count_pass(self, network: str, now: float) -> None:
        # Read and write with nothing awaited between them: no other request of this
        # process can interleave, and one SQLite file has one policy process writing it.
        row = self.db.execute(
            "SELECT passes, last_seen FROM clients WHERE network = ?", (network,)
        ).fetchone()
        record = record_pass(ClientRecord(*row) if row else None, now, self.max_age)
        if record is None:
            return
        self.write(
            "INSERT OR REPLACE INTO clients VALUES (?, ?, ?)",
            (network, record.passes, record.last_seen),
        )

    async def purge(self, now: float) -> int:
        self._commit()
        removed = self.db.execute(
            "DELETE FROM triplets WHERE last_seen < ? OR (passed = 0 AND first_seen < ?)",
            (now - self.max_age, now - self.retry_window))
        self.db.execute("DELETE FROM clients WHERE last_seen < ?", (now - self.max_age,))
        return removed.rowcount

    async def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM triplets").fetchone()[0])

    async def entries(self, limit: int, match: str = "") -> list[tuple[str, Triplet]]:
        pattern = "%" + like_escape(match) + "%"
        rows = self.db.execute(
            "SELECT key, first_seen, last_seen, passed FROM triplets WHERE key LIKE ? "
            "ESCAPE '\\' ORDER BY last_seen DESC LIMIT ?", (pattern, limit),
        ).fetchall()
        return [(row[0], Triplet(row[1], row[2], bool(row[3]))) for row in rows]

    async def delete(self, key: str) -> bool:
        return self.write_now("DELETE FROM triplets WHERE key=?", (key,)) > 0

    async def whitelist(self) -> list[WhitelistEntry]:
        rows = self.db.execute("SELECT kind, value, added FROM whitelist ORDER BY kind, value")
        return [WhitelistEntry(cast(WhitelistKind, k), v, a) for k, v, a in rows.fetchall()]

    async def add_whitelist(self, entry: WhitelistEntry) -> bool:
        return self.write_now(
            "INSERT OR IGNORE INTO whitelist VALUES (?, ?, ?)",
            (entry.kind, entry.value, entry.added),
        ) > 0

    async def remove_whitelist(self, kind: WhitelistKind, value: str) -> bool:
        return self.write_now(
            "DELETE FROM whitelist WHERE kind=? AND value=?", (kind, value)
        ) > 0

    async def close(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        self._commit()
        self.db.close()


class PasswordFile(CredentialProvider):
    """Redis's password, read from a file at each new connection (the redis-auth volume,
    where Redis writes it at its first start, maybe after this service started): no file,
    no AUTH (a Redis of the admin's own without a password)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            password = Path(self.path).read_text().strip()
        except OSError:
            return ()  # type: ignore[return-value]
        return (password,) if password else ()  # type: ignore[return-value]

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class RedisStore:
    """Shared state for scaled policy replicas; Redis expires old entries by itself."""

    PREFIX = "secumail:greylist:"
    # record_pass inside Redis, so that replicas counting one network at once count it once:
    # nothing within an hour of the last counted pass, else one more. A record older than
    # max_age has expired (EXPIRE), which is record_pass's starting over.
    COUNT_PASS = """
        local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
        local now = tonumber(ARGV[1])
        if last and math.abs(now - last) < tonumber(ARGV[2]) then return 0 end
        redis.call('HINCRBY', KEYS[1], 'passes', 1)
        redis.call('HSET', KEYS[1], 'last', ARGV[1])
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        return 1
    """

    def __init__(self, url: str, max_age: int, timeout: float = 2.0,
                 password_file: str = "",
                 retry_window: int = RETRY_WINDOW) -> None:
        # A password in the URL wins; else the password file's, if there is one.
        credentials = PasswordFile(password_file) if password_file and not urlparse(
            url).password else None
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True,
            credential_provider=credentials,
        )
        self.max_age = max_age
        self.retry_window = retry_window
        self._count_pass = self.redis.register_script(self.COUNT_PASS)

    async def lookup(self, network: str, key: str) -> tuple[ClientRecord | None, Triplet | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.PREFIX + "c:" + network)
            pipe.hgetall(self.PREFIX + "t:" + key)
            client, triplet = await pipe.execute()
        return (
            ClientRecord(int(client["passes"]), float(client["last"])) if client else None,
            _triplet(triplet) if triplet else None,
        )

    async def put(self, key: str, entry: Triplet) -> None:
        name = self.PREFIX + "t:" + key
        mapping: dict[str | bytes | bytearray | memoryview | int | float, float] = {
            "first": entry.first_seen, "last": entry.last_seen, "passed": int(entry.passed)
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, mapping=mapping)
            # Relative to the entry's own last sight (now, when the policy service stores
            # it): no replica's clock skew, nor a test's clock, shortens or stretches it.
            seconds = lifetime(entry, self.max_age, self.retry_window) - entry.last_seen
            pipe.expire(name, max(1, int(seconds) + 1))
            await pipe.execute()

    async def count_pass(self, network: str, now: float) -> None:
        await self._count_pass(keys=[self.PREFIX + "c:" + network],
                               args=[repr(now), AWL_COUNT_INTERVAL, self.max_age])

    async def purge(self, now: float) -> int:
        return 0  # keys carry their own expiry

    async def count(self) -> int:
        total = 0
        async for _ in self.redis.scan_iter(match=self.PREFIX + "t:*", count=1000):
            total += 1
        return total

    async def entries(self, limit: int, match: str = "") -> list[tuple[str, Triplet]]:
        pattern = self.PREFIX + "t:*" + glob_escape(match) + "*"
        names: list[str] = []
        async for name in self.redis.scan_iter(match=pattern, count=1000):
            names.append(name)
            if len(names) >= limit:
                break
        found = []
        for name in names:
            data = cast(dict[str, str], await self.redis.hgetall(name))
            if data:  # expired between SCAN and HGETALL
                found.append((name.removeprefix(self.PREFIX + "t:"), _triplet(data)))
        return sorted(found, key=lambda item: -item[1].last_seen)

    async def delete(self, key: str) -> bool:
        return bool(await self.redis.delete(self.PREFIX + "t:" + key))

    async def whitelist(self) -> list[WhitelistEntry]:
        # decode_responses=True: names and values are str.
        data = cast(dict[str, str], await self.redis.hgetall(self.PREFIX + "w"))
        entries = []
        for field, added in data.items():
            kind, _, value = field.partition(":")
            entries.append(WhitelistEntry(cast(WhitelistKind, kind), value, float(added)))
        return sorted(entries, key=lambda e: (e.kind, e.value))

    async def add_whitelist(self, entry: WhitelistEntry) -> bool:
        field = f"{entry.kind}:{entry.value}"
        return bool(await self.redis.hsetnx(self.PREFIX + "w", field, str(entry.added)))

    async def remove_whitelist(self, kind: WhitelistKind, value: str) -> bool:
        return bool(await self.redis.hdel(self.PREFIX + "w", f"{kind}:{value}"))

    async def close(self) -> None:
        await self.redis.aclose()


def _triplet(fields: dict[str, str]) -> Triplet:
    """A triplet from its Redis hash."""
    return Triplet(float(fields["first"]), float(fields["last"]), fields["passed"] == "1")


def lifetime(entry: Triplet, max_age: int, retry_window: int) -> float:
    """Until when a triplet counts: a passed one max_age after it was last seen; one never
    passed until its retry window closes (a retry after it starts over, check_triplet):
    keeping it longer only lets a flood of one-off senders fill the store."""
    if entry.passed:
        return entry.last_seen + max_age
    return entry.first_seen + retry_window


def open_store(url: str, max_age: int, redis_password_file: str = "",
               retry_window: int = RETRY_WINDOW) -> GreylistStore:
    """`sqlite:///abs/path`, `sqlite://:memory:` or `redis://host:port/db`."""
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, max_age, password_file=redis_password_file,
                          retry_window=retry_window)
    parsed = urlparse(url)
    path = parsed.netloc + parsed.path if parsed.netloc == ":memory:" else parsed.path
    if not path:
        raise ValueError(f"no path in greylist store URL {url!r}")
    return SqliteStore(path, max_age, retry_window)
