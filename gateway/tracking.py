"""Message tracking in the gateway: every replica's events collected into one store, and
the search that turns them back into each message's path.

Why SQLite, in the gateway's own volume: one writer (this collector) and one reader (the
API) in one process; indexes on every field an admin searches by; bounded by age and
count, and each search by the events it reads and its time (SEARCH_EVENT_CAP,
SEARCH_SECONDS: an answer they cut says so); no new network path or credential into the
services that read hostile mail (they only serve their events, secumail/tracking.py). A
replica's events not collected before its ring moved past them, or before it ended, are
counted as lost (secumail_tracking_events_lost_total); mail never waits for any of this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client import CollectorRegistry, Counter

from gateway.health import Namer, reverse_name
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
# Outcomes that do not say where a message ended: a hop passed it on, Bayes learned it, a
# TLS session carried it.
NOT_WHERE_IT_ENDED = frozenset({"passed", "learned", "tls"})
PAGES_PER_ROUND = 10  # /events answers 5,000 at most: 50,000 per replica per round
SEARCH_LIMIT = 500  # events matching the criteria one search starts from, newest first
# What one search may cost, whoever made the events it meets (issue 30: an outsider's 125,000
# greylisted RCPTs to others made a search for their one recipient load them all and weigh
# each against every message, 40 s and 440 MiB): the events it loads in all, and the time it
# loads them in (SQLite's own work included). A search stopped by either answers with what it
# has, and says so. Linking what it loaded gets LINK_SECONDS more at most.
SEARCH_EVENT_CAP = 20_000
SEARCH_SECONDS = 1.5
LINK_SECONDS = 0.25
# Rounds of "the events sharing a queue id or a Message-ID with those found": a message gets
# a new queue id at each queue it passes (before the filters, after them, the DKIM milter).
ID_ROUNDS = 3
IDS_PER_QUERY = 250  # ids in one IN (...), far below SQLite's limit on parameters
PROGRESS_STEPS = 2000  # SQLite instructions between two looks at a search's clock
CUTS = {
    "matches": "more than {limit} events matched: only the newest {limit} were searched",
    "loose": "more than {limit} events without a queue id (policy answers, refusals at RCPT) "
             "may belong to one message: only the newest {limit} were read",
    "events": "it read {events:,} events, the most one search reads",
    "time": "it ran {seconds:g} s, the longest one search runs",
}

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
-- The id-less events one client sent from one sender: what may join a message found
-- (TrackingStore._expand_loose), read without the client's or the sender's other events.
CREATE INDEX IF NOT EXISTS events_loose ON events(client, sender, time)
    WHERE queue_id = '' AND next_queue_id = '' AND message_id = '';
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
        """The last event that is not a hop passing it on ("passed") or a note on its path
        ("learned": Bayes taught it, wherever it is): delivered, bounced, refused,
        greylisted, deferred, quarantined, released... or "passed" when that is all, else the
        last note ("learned" for a message only learned: one uploaded, or a user's report of
        one not tracked)."""
        for stored in reversed(self.events):
            if stored.event.outcome not in NOT_WHERE_IT_ENDED:
                return stored.event.outcome
        if any(s.event.outcome == "passed" for s in self.events):
            return "passed"
        return self.events[-1].event.outcome if self.events else "learned"

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


@dataclass
class Found:
    """A search's answer: the messages, newest first, and why the search stopped short of
    finding them all ("" when it did not: `cut` says what stopped it, `why` in words)."""

    traces: list[Trace]
    cut: str = ""  # "", or the first of CUTS that cut it
    why: str = ""  # all that cut it, in words
    loaded: int = 0  # events read from the store


class Budget:
    """What one search may still spend: events to load, and time (`timer`'s seconds)."""

    def __init__(self, events: int, seconds: float,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.events = events  # left to load
        self.loaded = 0
        self.timer = timer
        self.deadline = timer() + seconds
        self.cuts: list[str] = []  # what cut the search short (CUTS' keys), first first

    def stop(self, reason: str) -> None:
        if reason not in self.cuts:
            self.cuts.append(reason)

    def late(self) -> bool:
        if self.timer() > self.deadline:
            self.stop("time")
            return True
        return False

    @property
    def spent(self) -> bool:
        """Nothing more to load: the events or the time are spent."""
        return "events" in self.cuts or "time" in self.cuts or self.late()


def _keys(event: Event) -> list[str]:
    return [k for k in (f"q:{event.queue_id}" if event.queue_id else "",
                        f"q:{event.next_queue_id}" if event.next_queue_id else "",
                        f"m:{event.message_id}" if event.message_id else "") if k]


def _link(ordered: list[StoredEvent]) -> tuple[list[list[int]], list[int]]:
    """The indexes of the events sharing a queue id (either side of a hop) or a Message-ID,
    in groups ordered by their first event (each group in order); and the events with
    neither, which join a group later (build_traces)."""
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
    for index in parent:  # in index order: groups in the order of their first event
        groups.setdefault(find(index), []).append(index)
    return list(groups.values()), loose


@dataclass(slots=True)
class _Message:
    """A group of linked events, and what a loose event must share with it to join it."""

    members: list[int]
    start: float
    end: float
    clients: frozenset[str]
    senders: frozenset[str]  # lower case
    recipients: frozenset[str]  # lower case


def _message(members: list[int], ordered: list[StoredEvent]) -> _Message:
    events = [ordered[i].event for i in members]
    return _Message(members, events[0].time, max(e.time for e in events),
                    frozenset(e.client for e in events if e.client),
                    frozenset(e.sender.lower() for e in events),
                    frozenset(r.lower() for e in events for r in e.recipients))


def _fits(event: Event, sender: str, recipients: frozenset[str], message: _Message) -> bool:
    """Whether a loose event may belong to a message: the same sender, the same client (when
    it has one), and no recipient the message has not."""
    return (sender in message.senders and (not event.client or event.client in message.clients)
            and recipients <= message.recipients)


class _Candidates:
    """The messages by sender and by recipient, each list in the order they began, so that a
    loose event is weighed against the few messages near it in time that have its sender and
    its recipients, not against every message (which was quadratic: issue 30)."""

    def __init__(self, messages: list[_Message]) -> None:
        self.messages = messages
        self.lists: dict[str, list[int]] = {}
        for number, message in enumerate(messages):
            for sender in message.senders:
                self.lists.setdefault("s:" + sender, []).append(number)
            for recipient in message.recipients:
                self.lists.setdefault("r:" + recipient, []).append(number)
        # key -> the listed messages' starts, and the latest end of any of them so far
        self.timelines: dict[str, tuple[list[float], list[float]]] = {}
        # Messages a loose event joined after their end, which it moved: (that end, number),
        # oldest first (the loose events come in time order).
        self.grown: deque[tuple[float, int]] = deque()

    def _timeline(self, key: str) -> tuple[list[float], list[float]]:
        if key not in self.timelines:
            starts, reach, latest = [], [], float("-inf")
            for number in self.lists[key]:
                message = self.messages[number]
                latest = max(latest, message.end)
                starts.append(message.start)
                reach.append(latest)
            self.timelines[key] = starts, reach
        return self.timelines[key]

    def join(self, number: int, moment: float) -> None:
        """A loose event at `moment` joined message `number`: it ends that late now."""
        message = self.messages[number]
        if moment > message.end:
            message.end = moment
            self.grown.append((moment, number))

    def best(self, event: Event, sender: str, recipients: frozenset[str]) -> int | None:
        """The message a loose event joins: the nearest in time that fits, within
        ATTACH_WINDOW before it begins or AFTER_SLACK after it ends (on a tie, the one that
        began last); None if none does."""
        keys = ["s:" + sender, *("r:" + r for r in recipients)]
        if any(key not in self.lists for key in keys):
            return None  # no message has its sender, or one of its recipients
        key = min(keys, key=lambda k: len(self.lists[k]))
        numbers, (starts, reach) = self.lists[key], self._timeline(key)
        moment = event.time
        best, best_gap = -1, ATTACH_WINDOW

        def weigh(number: int, gap: float) -> None:
            nonlocal best, best_gap
            if (gap, -number) < (best_gap, -best) and _fits(event, sender, recipients,
                                                            self.messages[number]):
                best, best_gap = number, gap

        while self.grown and self.grown[0][0] < moment - AFTER_SLACK:
            self.grown.popleft()
        for _, number in self.grown:  # moved past what `reach` says
            weigh(number, max(0.0, moment - self.messages[number].end))
        split = bisect_right(starts, moment)
        for j in range(split - 1, -1, -1):  # begun by then, latest first
            if reach[j] < moment - AFTER_SLACK:
                break  # none begun earlier ended late enough (but those in `grown`)
            gap = max(0.0, moment - self.messages[numbers[j]].end)
            if gap <= AFTER_SLACK:
                weigh(numbers[j], gap)
                if best_gap == 0.0 and best >= numbers[j]:
                    break  # none earlier is nearer, or as near and begun later
        for j in range(split, len(numbers)):  # begun after it, earliest first
            gap = starts[j] - moment
            if gap > best_gap:
                break
            weigh(numbers[j], gap)
        return None if best < 0 else best


def build_traces(stored: Iterable[StoredEvent], budget: Budget | None = None) -> list[Trace]:
    """Events grouped into messages, newest message first. Events sharing a queue id
    (either side of a hop) or a Message-ID are one message; an event with neither joins the
    next message of the same client, sender and recipients (see ATTACH_WINDOW), or the
    other such events before it (a client greylisted twice that never came back).
    Once the budget's time is spent, the events with neither are left on their own."""
    ordered = sorted({s.id or id(s): s for s in stored}.values(),
                     key=lambda s: (s.event.time, s.id))
    linked, loose = _link(ordered)
    messages = [_message(members, ordered) for members in linked]
    candidates = _Candidates(messages)
    chains: dict[tuple[str, str, frozenset[str]], list[int]] = {}
    ended: list[list[int]] = []  # chains a later retry did not continue
    weigh = True
    for count, index in enumerate(loose):
        if weigh and budget is not None and count % 256 == 0 and budget.late():
            weigh = False
        event = ordered[index].event
        sender = event.sender.lower()
        recipients = frozenset(r.lower() for r in event.recipients)
        best = candidates.best(event, sender, recipients) if weigh else None
        if best is not None:
            messages[best].members.append(index)
            candidates.join(best, event.time)
            continue
        chain = chains.setdefault((event.client, sender, recipients), [])
        if chain and event.time - ordered[chain[-1]].event.time > ATTACH_WINDOW:
            ended.append(chain[:])
            chain.clear()
        chain.append(index)
    groups = [m.members for m in messages] + ended + [c for c in chains.values() if c]
    traces = [Trace([ordered[i] for i in sorted(members)]) for members in groups]
    return sorted(traces, key=lambda t: t.events[-1].event.time, reverse=True)


class TrackingStore:
    """The events, in SQLite; every method runs in a worker thread (asyncio.to_thread)."""

    def __init__(self, path: str, retention: float, max_events: int,
                 clock: Callable[[], float] = time.time, *,
                 search_events: int = SEARCH_EVENT_CAP, search_seconds: float = SEARCH_SECONDS,
                 timer: Callable[[], float] = time.monotonic) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.retention = retention
        self.max_events = max_events
        self.clock = clock
        self.search_events = search_events
        self.search_seconds = search_seconds
        self.timer = timer  # a search's clock (time.monotonic)
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
                self._insert(events)
                self.db.execute(
                    "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT(boot) DO UPDATE "
                    "SET last = excluded.last, seen = excluded.seen", (boot, last, self.clock()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def add_own(self, events: list[StoredEvent]) -> None:
        """The gateway's own events (a release, a learning act: gateway/quarantine.py),
        stored as they happen: no replica serves them, no cursor moves."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                self._insert(events)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _insert(self, events: list[StoredEvent]) -> None:
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
        return self.find(search).traces

    def find(self, search: Search) -> Found:
        """`search`'s messages, and whether the search's bounds cut them short: at most
        `search_events` events loaded, in `search_seconds` (then LINK_SECONDS to link them)."""
        where, args, source, order = seed_query(search)
        with self.lock:  # its time from here: another search's wait is not its work
            budget = Budget(self.search_events, self.search_seconds, self.timer)
            self.db.set_progress_handler(lambda: budget.timer() > budget.deadline,
                                         PROGRESS_STEPS)  # stops a query once it is late
            try:
                seeds, more = self._select(where, args, budget, limit=SEARCH_LIMIT,
                                           source=source, order=order)
                found = {s.id: s for s in seeds}
                self._expand(found, budget)
            finally:
                self.db.set_progress_handler(None, 0)
        budget.deadline = max(budget.deadline, budget.timer() + LINK_SECONDS)
        traces = build_traces(found.values(), budget)
        seed_ids = {s.id for s in seeds}
        matching = [t for t in traces if any(e.id in seed_ids for e in t.events)]
        if more and len(seeds) == SEARCH_LIMIT and len(matching) < search.limit:
            budget.stop("matches")  # older messages matched, unseen
        why = "; ".join(CUTS[cut].format(limit=SEARCH_LIMIT, events=self.search_events,
                                         seconds=self.search_seconds) for cut in budget.cuts)
        return Found(matching[:search.limit], budget.cuts[0] if budget.cuts else "", why,
                     budget.loaded)

    def _expand(self, found: dict[int, StoredEvent], budget: Budget) -> None:
        """Add the events that share an id with those found (the message's other hops),
        then the id-less ones (policy answers, refusals at RCPT) that may join them."""
        asked_queue_ids: set[str] = set()
        asked_message_ids: set[str] = set()
        fresh = list(found.values())
        for _ in range(ID_ROUNDS):  # each id asked for once
            queue_ids = sorted({q for s in fresh for q in (s.event.queue_id,
                                                            s.event.next_queue_id) if q}
                               - asked_queue_ids)
            message_ids = sorted({s.event.message_id for s in fresh if s.event.message_id}
                                 - asked_message_ids)
            asked_queue_ids.update(queue_ids)
            asked_message_ids.update(message_ids)
            # "!= ''": what lets SQLite use the partial indexes (without it: every event read)
            queries = [*((f"(e.queue_id IN ({_marks(part)}) AND e.queue_id != '') OR "
                          f"(e.next_queue_id IN ({_marks(part)}) AND e.next_queue_id != '')",
                          [*part, *part]) for part in _parts(queue_ids)),
                       *((f"e.message_id IN ({_marks(part)}) AND e.message_id != ''", part)
                         for part in _parts(message_ids))]
            fresh = []
            for where, args in queries:
                rows, _ = self._select(where, args, budget)
                for stored in rows:
                    if stored.id not in found:
                        found[stored.id] = stored
                        fresh.append(stored)
                if budget.spent:
                    return
            if not fresh:
                break
        self._expand_loose(found, budget)

    def _expand_loose(self, found: dict[int, StoredEvent], budget: Budget) -> None:
        """The id-less events that may join a message found: its client and sender, within
        ATTACH_WINDOW before it or AFTER_SLACK after, and no recipient it has not. That last
        in SQL: an outsider's RCPTs to others, however many, are never loaded (issue 30)."""
        for client, sender, first, last, recipients in loose_wanted(found.values()):
            if budget.spent:
                return
            rows, more = self._select(
                "e.client = ? AND e.sender = ? AND e.time BETWEEN ? AND ? AND e.queue_id = '' "
                "AND e.next_queue_id = '' AND e.message_id = '' AND NOT EXISTS (SELECT 1 FROM "
                "recipients r WHERE r.event = e.id AND r.address NOT IN "
                "(SELECT value FROM json_each(?)))",
                [client, sender, first - ATTACH_WINDOW, last + AFTER_SLACK, recipients],
                budget, limit=SEARCH_LIMIT)  # one flooded message does not take all the cap
            for stored in rows:
                found.setdefault(stored.id, stored)
            if more:
                budget.stop("loose")

    def _select(self, where: str, args: list[Any], budget: Budget, *, limit: int | None = None,
                source: str = "events e", order: str = "e.time DESC"
                ) -> tuple[list[StoredEvent], bool]:
        """The events matching `where`, in `order`, as many as `limit` and the budget allow;
        and whether more matched. A query the budget's time ran out in gives what it read."""
        room = budget.events if limit is None else min(limit, budget.events)
        rows: list[StoredEvent] = []
        try:
            for row in self.db.execute(
                    f"SELECT {', '.join('e.' + c for c in COLUMNS)}, "
                    "(SELECT group_concat(address, char(10)) FROM recipients WHERE event = e.id) "
                    f"FROM {source} WHERE {where} ORDER BY {order} LIMIT ?", [*args, room + 1]):
                rows.append(_stored(row))
        except sqlite3.OperationalError:
            if not budget.late():  # not the progress handler stopping a late query
                raise
        more = len(rows) > room
        if more:
            del rows[room:]
            if room == budget.events:
                budget.stop("events")
        budget.events -= len(rows)
        budget.loaded += len(rows)
        return rows, more

    def close(self) -> None:
        with self.lock:
            self.db.close()


def seed_query(search: Search) -> tuple[str, list[Any], str, str]:
    """The SQL for the events matching every criterion given: WHERE, its arguments, FROM, and
    an ORDER BY an index gives newest first, unsorted (LIMIT then reads no more than it
    keeps, though an outsider can make millions of events name one recipient)."""
    where = ["e.time >= ?", "e.time <= ?"]
    args: list[Any] = [search.since, search.until]
    for column in ("sender", "client"):
        value = getattr(search, column)
        if value:
            where.append(f"e.{column} = ?")
            args.append(value)
    # "!= ''": what lets SQLite use the partial indexes on ids (without it: every event read)
    if search.message_id:
        where.append("e.message_id = ? AND e.message_id != ''")
        args.append(search.message_id.strip("<>"))
    if search.queue_id:
        where.append("((e.queue_id = ? AND e.queue_id != '') OR "
                     "(e.next_queue_id = ? AND e.next_queue_id != ''))")
        args += [search.queue_id, search.queue_id]
    source, order = "events e", "e.time DESC"
    if search.recipient and not (search.sender or search.client):
        # By the recipient's index, newest stored first: the order the collector stored
        # them in, within seconds of their times'.
        source, order = "recipients r JOIN events e ON e.id = r.event", "r.rowid DESC"
        where.append("r.address = ?")
        args.append(search.recipient)
    elif search.recipient:  # the sender's or client's events, each looked up (not a list
        # of every event naming the recipient, made first: 0.2 s for a busy one)
        where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.event = e.id "
                     "AND r.address = ?)")
        args.append(search.recipient)
    return " AND ".join(where), args, source, order


def loose_wanted(found: Iterable[StoredEvent]
                 ) -> Iterator[tuple[str, str, float, float, str]]:
    """For each client and sender of an event found, the id-less events that may join its
    message (build_traces' rule): client, sender, from when to when, and the recipients they
    may name (a JSON array, for SQLite's json_each). The latest first (the budget may not
    last), each worked out only when asked for."""
    events = sorted(found, key=lambda s: (s.event.time, s.id))
    linked, loose = _link(events)
    groups = [*linked, *([index] for index in loose)]
    wanted: dict[tuple[str, str], tuple[float, float, list[int]]] = {}
    for number, members in enumerate(groups):
        first, last = events[members[0]].event.time, events[members[-1]].event.time
        for pair in {(events[i].event.client, events[i].event.sender.lower()) for i in members
                     if events[i].event.client}:
            start, end, numbers = wanted.get(pair, (first, last, []))
            numbers.append(number)
            wanted[pair] = min(start, first), max(end, last), numbers
    named: dict[int, frozenset[str]] = {}  # a group's recipients, worked out once

    def recipients(number: int) -> frozenset[str]:
        if number not in named:
            named[number] = frozenset(r.lower() for i in groups[number]
                                      for r in events[i].event.recipients)
        return named[number]

    for (client, sender), (start, end, numbers) in sorted(
            wanted.items(), key=lambda item: item[1][1], reverse=True):
        yield (client, sender, start, end,
               json.dumps(sorted(frozenset().union(*map(recipients, numbers)))))


def _parts(ids: list[str]) -> list[list[str]]:
    return [ids[i:i + IDS_PER_QUERY] for i in range(0, len(ids), IDS_PER_QUERY)]


def _marks(ids: list[str]) -> str:
    return ",".join("?" * len(ids))


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
Stored = Callable[[str, list[StoredEvent]], None]  # (service, events just stored)


class Collector:
    """Asks every replica for its events past the last one stored, and stores them, each
    named by the replica that made it: its container's name, looked up when a new process
    (a new boot) first answers at an address, and kept for that process. Addresses move
    (`up -d` recreating two services may swap theirs), a process does not: a name kept by
    address named one service's events after the other for good (issue 32)."""

    def __init__(self, store: TrackingStore, client: httpx2.AsyncClient, targets: Targets,
                 metrics: TrackingMetrics, timeout: float, namer: Namer = reverse_name,
                 stored: Stored | None = None) -> None:
        self.store = store
        self.stored = stored  # told (in a thread) what each service's replica gave
        self.client = client
        self.targets = targets
        self.metrics = metrics
        self.timeout = timeout
        self.namer = namer
        self._boots: dict[str, str] = {}  # replica (instance) -> the boot it last answered
        self._names: dict[str, str] = {}  # boot -> the name of the replica that runs it

    async def _name(self, target: Target) -> str:
        """The container's name now (Docker's DNS, which knows the process that just
        answered), else what /health last named it, else its address."""
        host = target.instance.rpartition(":")[0].strip("[]")
        return await self.namer(host) or target.container or target.instance

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
                self._names.pop(self._boots.get(target.instance, ""), None)
                self._boots[target.instance] = boot
                self._names[boot] = await self._name(target)
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
                    events.append(StoredEvent(event, self._names[boot]))
            if top > after:
                await asyncio.to_thread(self.store.add, boot, top, events)
                if self.stored is not None:
                    await asyncio.to_thread(self.stored, target.service, events)
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
