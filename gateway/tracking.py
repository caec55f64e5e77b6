"""Message tracking in the gateway: every replica's events collected into one store, and
the search that turns them back into each message's path.

Why SQLite, in the gateway's own volume: one writer (this collector) and one reader (the
API) in one process; indexes on every field an admin searches by; bounded by age and
count; no new network path or credential into the services that read hostile mail (they
only serve their events, secumail/tracking.py). A replica's events not collected before its
ring moved past them, or before it ended, are counted as lost
(secumail_tracking_events_lost_total); mail never waits for any of this.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client import CollectorRegistry, Counter

from gateway.scrape import Target
from secumail.logs import log_event
from secumail.tracking import Event

log = logging.getLogger("secumail.gateway.tracking")

# A decision without a queue id or Message-ID (a policy answer, a refusal at RCPT) belongs
# to the message the same client sent from the same sender to the same recipients next,
# within this many seconds (a greylisted client retries within hours).
ATTACH_WINDOW = 24 * 3600.0
# ... or the message it came just after: Postfix logs a before-queue refusal by the filters
# once they answered, after the filters' own events (dated when they got the message).
AFTER_SLACK = 120.0
# Outcomes that say where a message ended, over those that say it moved on.
PAGES_PER_ROUND = 10  # /events answers 5,000 at most: 50,000 per replica per round
SEARCH_LIMIT = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, service TEXT NOT NULL, replica TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT NOT NULL, client TEXT NOT NULL,
    sender TEXT NOT NULL COLLATE NOCASE, queue_id TEXT NOT NULL, next_queue_id TEXT NOT NULL,
    message_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recipients (
    event INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
    address TEXT NOT NULL COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS cursors (boot TEXT PRIMARY KEY, last INTEGER NOT NULL,
    seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_sender ON events(sender, time);
CREATE INDEX IF NOT EXISTS events_client ON events(client, time);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id) WHERE queue_id != '';
CREATE INDEX IF NOT EXISTS events_next_queue_id ON events(next_queue_id)
    WHERE next_queue_id != '';
CREATE INDEX IF NOT EXISTS events_message_id ON events(message_id) WHERE message_id != '';
CREATE INDEX IF NOT EXISTS recipients_address ON recipients(address);
CREATE INDEX IF NOT EXISTS recipients_event ON recipients(event);
"""
COLUMNS = ("id", "time", "service", "replica", "outcome", "detail", "client", "sender",
           "queue_id", "next_queue_id", "message_id")


@dataclass(frozen=True)
class Search:
    """What an admin asks: any of these (all given must match one event of the message)."""

    sender: str = ""
    recipient: str = ""
    client: str = ""
    message_id: str = ""
    queue_id: str = ""
    since: float = 0.0
    until: float = float("inf")
    limit: int = 50


@dataclass
class StoredEvent:
    event: Event
    replica: str
    id: int = 0


@dataclass
class Trace:
    """One message's path: its events in time order, and where it ended."""

    events: list[StoredEvent] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """The last event that is not a hop passing it on ("passed"): delivered, bounced,
        refused, greylisted, deferred, quarantined... or "passed" when that is all."""
        for stored in reversed(self.events):
            if stored.event.outcome != "passed":
                return stored.event.outcome
        return "passed"

    def to_dict(self) -> dict[str, Any]:
        events = [e.event for e in self.events]
        return {
            "first": events[0].time, "last": events[-1].time, "outcome": self.outcome,
            "client": next((e.client for e in events if e.client), ""),
            "sender": next((e.sender for e in events if e.sender), ""),
            "recipients": sorted({r for e in events for r in e.recipients}),
            "message_id": next((e.message_id for e in events if e.message_id), ""),
            "queue_ids": sorted({q for e in events for q in (e.queue_id, e.next_queue_id)
                                 if q}),
            "events": [{**e.event.to_dict(), "replica": e.replica} for e in self.events],
        }


def _keys(event: Event) -> list[str]:
    return [k for k in (f"q:{event.queue_id}" if event.queue_id else "",
                        f"q:{event.next_queue_id}" if event.next_queue_id else "",
                        f"m:{event.message_id}" if event.message_id else "") if k]


def build_traces(stored: Iterable[StoredEvent]) -> list[Trace]:
    """Events grouped into messages, newest message first. Events sharing a queue id
    (either side of a hop) or a Message-ID are one message; an event with neither joins the
    next message of the same client, sender and recipients (see ATTACH_WINDOW), or the
    other such events before it (a client greylisted twice that never came back)."""
    ordered = sorted({s.id or id(s): s for s in stored}.values(),
                     key=lambda s: (s.event.time, s.id))
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    loose: list[int] = []
    for index, item in enumerate(ordered):
        keys = _keys(item.event)
        if not keys:
            loose.append(index)
            continue
        find(index)
        for key in keys:
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    groups: dict[int, list[int]] = {}
    for index in parent:
        groups.setdefault(find(index), []).append(index)
    linked = [sorted(members) for members in groups.values()]

    def who(indexes: list[int]) -> tuple[set[str], set[str], set[str]]:
        events = [ordered[i].event for i in indexes]
        return ({e.client for e in events if e.client}, {e.sender.lower() for e in events},
                {r.lower() for e in events for r in e.recipients})

    facts = [who(g) for g in linked]
    loose_traces: dict[tuple[str, str, frozenset[str]], list[int]] = {}
    for index in loose:
        event = ordered[index].event
        recipients = {r.lower() for r in event.recipients}
        best, best_gap = None, ATTACH_WINDOW
        for number, members in enumerate(linked):
            start = ordered[members[0]].event.time
            end = max(ordered[i].event.time for i in members)
            gap = start - event.time if event.time < start else max(0.0, event.time - end)
            clients, senders, group_recipients = facts[number]
            if (event.time <= end + AFTER_SLACK and gap <= best_gap
                    and event.sender.lower() in senders
                    and (not event.client or event.client in clients)
                    and recipients <= group_recipients):
                best, best_gap = number, gap
        if best is not None:
            linked[best].append(index)
            continue
        who_key = (event.client, event.sender.lower(), frozenset(recipients))
        chain = loose_traces.setdefault(who_key, [])
        if chain and event.time - ordered[chain[-1]].event.time > ATTACH_WINDOW:
            linked.append(list(chain))
            chain.clear()
        chain.append(index)
    linked.extend(chain for chain in loose_traces.values() if chain)
    traces = [Trace([ordered[i] for i in sorted(members)]) for members in linked]
    return sorted(traces, key=lambda t: t.events[-1].event.time, reverse=True)


class TrackingStore:
    """The events, in SQLite; every method runs in a worker thread (asyncio.to_thread)."""

    def __init__(self, path: str, retention: float, max_events: int,
                 clock: Callable[[], float] = time.time) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.retention = retention
        self.max_events = max_events
        self.clock = clock
        self.lock = threading.Lock()

    def cursor(self, boot: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT last FROM cursors WHERE boot = ?", (boot,)).fetchone()
        return int(row[0]) if row else 0

    def add(self, boot: str, last: int, events: list[StoredEvent]) -> None:
        """The events of one answer and the replica's new cursor, in one transaction (a
        gateway that stops between two never stores an event twice)."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                for stored in events:
                    e = stored.event
                    row = self.db.execute(
                        "INSERT INTO events (time, service, replica, outcome, detail, client, "
                        "sender, queue_id, next_queue_id, message_id) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (e.time, e.service, stored.replica, e.outcome, e.detail, e.client,
                         e.sender, e.queue_id, e.next_queue_id, e.message_id))
                    self.db.executemany("INSERT INTO recipients VALUES (?, ?)",
                                        [(row.lastrowid, r) for r in e.recipients])
                self.db.execute(
                    "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT(boot) DO UPDATE "
                    "SET last = excluded.last, seen = excluded.seen", (boot, last, self.clock()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def prune(self) -> int:
        """Events past the retention or over the count, oldest first; cursors of replicas
        not heard of in the retention."""
        cutoff = self.clock() - self.retention
        with self.lock:
            removed = self.db.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount
            row = self.db.execute("SELECT max(id) FROM events").fetchone()
            if row[0] is not None:
                removed += self.db.execute("DELETE FROM events WHERE id <= ?",
                                           (row[0] - self.max_events,)).rowcount
            self.db.execute("DELETE FROM cursors WHERE seen < ?", (cutoff,))
        return removed

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def search(self, search: Search) -> list[Trace]:
        """The messages one of whose events matches every criterion given, newest first."""
        where = ["e.time >= ?", "e.time <= ?"]
        args: list[Any] = [search.since, search.until]
        for column in ("sender", "client", "message_id"):
            value = getattr(search, column)
            if value:
                where.append(f"e.{column} = ?")
                args.append(value.strip("<>") if column == "message_id" else value)
        if search.queue_id:
            where.append("(e.queue_id = ? OR e.next_queue_id = ?)")
            args += [search.queue_id, search.queue_id]
        if search.recipient:
            where.append("e.id IN (SELECT event FROM recipients WHERE address = ?)")
            args.append(search.recipient)
        with self.lock:
            seeds = self._select(" AND ".join(where), args, SEARCH_LIMIT)
            found = {s.id: s for s in seeds}
            self._expand(found)
        traces = build_traces(found.values())
        seed_ids = {s.id for s in seeds}
        matching = [t for t in traces if any(e.id in seed_ids for e in t.events)]
        return matching[:search.limit]

    def _expand(self, found: dict[int, StoredEvent]) -> None:
        """Add the events that share an id with those found (the message's other hops),
        then the id-less ones (policy answers, refusals at RCPT) of the same senders."""
        for _ in range(3):
            queue_ids = {q for s in found.values()
                         for q in (s.event.queue_id, s.event.next_queue_id) if q}
            message_ids = {s.event.message_id for s in found.values() if s.event.message_id}
            if not queue_ids and not message_ids:
                break
            q_marks, m_marks = ",".join("?" * len(queue_ids)), ",".join("?" * len(message_ids))
            more = self._select(
                f"e.queue_id IN ({q_marks}) OR e.next_queue_id IN ({q_marks}) "
                f"OR e.message_id IN ({m_marks})",
                [*queue_ids, *queue_ids, *message_ids], SEARCH_LIMIT * 4)
            new = [s for s in more if s.id not in found]
            if not new:
                break
            found.update((s.id, s) for s in new)
        pairs = {(s.event.client, s.event.sender) for s in found.values() if s.event.client}
        if not found:
            return
        start = min(s.event.time for s in found.values()) - ATTACH_WINDOW
        end = max(s.event.time for s in found.values())
        for client, sender in list(pairs)[:SEARCH_LIMIT]:
            for s in self._select(
                    "e.client = ? AND e.sender = ? AND e.time BETWEEN ? AND ? AND "
                    "e.queue_id = '' AND e.next_queue_id = '' AND e.message_id = ''",
                    [client, sender, start, end], SEARCH_LIMIT):
                found.setdefault(s.id, s)

    def _select(self, where: str, args: list[Any], limit: int) -> list[StoredEvent]:
        rows = self.db.execute(
            f"SELECT {', '.join('e.' + c for c in COLUMNS)}, "
            "(SELECT group_concat(address, char(10)) FROM recipients WHERE event = e.id) "
            f"FROM events e WHERE {where} ORDER BY e.time DESC LIMIT ?", [*args, limit])
        return [_stored(row) for row in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _stored(row: tuple[Any, ...]) -> StoredEvent:
    data = dict(zip(COLUMNS, row, strict=False))
    recipients = tuple(row[-1].split("\n")) if row[-1] else ()
    event = Event(data["service"], data["outcome"], data["detail"], data["client"],
                  data["sender"], recipients, data["queue_id"], data["next_queue_id"],
                  data["message_id"], data["time"])
    return StoredEvent(event, data["replica"], data["id"])


class TrackingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.collected = Counter("secumail_tracking_events_collected",
                                 "Tracking events the gateway stored, by service", ["service"],
                                 registry=registry)
        self.lost = Counter("secumail_tracking_events_lost",
                            "Tracking events a replica no longer held when the gateway asked "
                            "(its ring moved past them), by service", ["service"],
                            registry=registry)
        self.errors = Counter("secumail_tracking_collect_errors",
                              "Failed collections of a replica's events, by service",
                              ["service"], registry=registry)


Targets = Callable[[], Awaitable[list[Target]]]


class Collector:
    """Asks every replica for its events past the last one stored, and stores them."""

    def __init__(self, store: TrackingStore, client: httpx2.AsyncClient, targets: Targets,
                 metrics: TrackingMetrics, timeout: float) -> None:
        self.store = store
        self.client = client
        self.targets = targets
        self.metrics = metrics
        self.timeout = timeout
        self._boots: dict[str, str] = {}  # replica (instance) -> the boot it last answered

    async def collect(self) -> int:
        """One round over every replica; the number of events stored."""
        targets = await self.targets()
        counts = await asyncio.gather(*(self._collect_one(t) for t in targets))
        return sum(counts)

    async def _collect_one(self, target: Target) -> int:
        stored = 0
        boot = self._boots.get(target.instance)
        after = await asyncio.to_thread(self.store.cursor, boot) if boot else 0
        for _ in range(PAGES_PER_ROUND):
            try:
                response = await self.client.get(f"http://{target.instance}/events",
                                                 params={"after": after}, timeout=self.timeout)
                response.raise_for_status()
                answer = response.json()
                boot, first, last = str(answer["boot"]), int(answer["first"]), int(answer["last"])
                raw = answer["events"]
                if not isinstance(raw, list):
                    raise ValueError("events is not a list")
            except (httpx2.HTTPError, ValueError, KeyError, TypeError) as error:
                self.metrics.errors.labels(target.service).inc()
                log_event(log, "events not collected", logging.DEBUG, replica=target.instance,
                          error=f"{type(error).__name__}: {error}")
                return stored
            if self._boots.get(target.instance) != boot:  # a new replica, or it restarted
                self._boots[target.instance] = boot
                cursor = await asyncio.to_thread(self.store.cursor, boot)
                if cursor != after:
                    after = cursor
                    continue
            if first > after + 1:
                self.metrics.lost.labels(target.service).inc(first - after - 1)
            events = []
            top = after
            for item in raw:
                try:
                    seq, row = int(item[0]), item[1]
                    event = Event.from_row(row)
                except (ValueError, KeyError, TypeError, IndexError):
                    continue  # one malformed event does not stop the others
                if seq > after:
                    top = max(top, seq)
                    events.append(StoredEvent(event, target.container or target.instance))
            if top > after:
                await asyncio.to_thread(self.store.add, boot, top, events)
                self.metrics.collected.labels(target.service).inc(len(events))
                stored += len(events)
            if top >= last or top == after:
                return stored
            after = top
        return stored

    async def every(self, interval: float, prune_every: float = 300.0) -> None:
        """Collect every `interval` seconds, prune every `prune_every`, until cancelled."""
        pruned = time.monotonic()
        while True:
            try:
                await self.collect()
                if time.monotonic() - pruned >= prune_every:
                    pruned = time.monotonic()
                    removed = await asyncio.to_thread(self.store.prune)
                    if removed:
                        log_event(log, "tracking events pruned", removed=removed)
            except (OSError, sqlite3.Error) as error:
                log_event(log, "tracking collection failed", logging.WARNING,
                          error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(interval)
