"""The tracking search's cost over a full store (issue 30's target: a search over 2,000,000
stored events answers within 2 s and 100 MiB), not a test: it asserts nothing.

Fills a store in a temporary directory with a week of mail (7 days, the default retention):
messages delivered, greylisted then retried, quarantined, refused at RCPT, from a few busy
providers and many small senders, plus the outsider of issue 30 (250 messages to alice from
250 senders, and from each sender 500 RCPTs to others that greylisting answers). Then runs
each search in a fresh process, as the API does (the search, then its JSON), and prints:
seconds, the process's peak RSS over what it had with the store open, the Python heap's peak
during the search (tracemalloc, in a second run: it slows what it watches), and the events
read, the messages found and what cut the search, if anything.

    .venv/bin/python bench/tracking_search_bench.py [--events 2000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import multiprocessing
import random
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.tracking import Search, StoredEvent, TrackingStore
from secumail import tracking
from secumail.tracking import Event

ROOT = Path(__file__).resolve().parents[1]

START = 1_800_000_000.0
WEEK = 7 * 86400.0
ALICE = "alice@secumail.test"
OUTSIDERS = 250
OUTSIDER_RCPTS = 500
BATCH = 5000  # events per store.add, as one collector answer
MiB = 2**20


def event(service: str, outcome: str, at: float, **fields: Any) -> Event:
    return tracking.event(service, outcome, **fields)._replace(time=at)


def delivered(at: float, who: dict[str, Any], queued: str, message_id: str) -> list[Event]:
    """A message's path as the chain records it: the policy answer without an id, then the
    filters, Postfix's queue, the DKIM milter and the delivery, tied by queue id and
    Message-ID."""
    return [
        event("policy", "passed", at, detail="greylist: known triplet", **who),
        event("clamav", "passed", at + 0.2, detail="clean", next_queue_id=queued,
              message_id=message_id, **who),
        event("spamd", "passed", at + 0.3, detail="score 1.2", next_queue_id=queued,
              message_id=message_id, **who),
        event("postfix", "accepted", at + 0.4, next_queue_id=queued, **who),
        event("dkim", "passed", at + 0.45, detail="signed", queue_id=queued,
              message_id=message_id, **who),
        event("postfix", "delivered", at + 0.6, detail="delivered to maildir",
              queue_id=queued, message_id=message_id, **who),
    ]


def outsider() -> list[Event]:
    """Issue 30's outsider, its message to alice on the last day."""
    events: list[Event] = []
    for i in range(OUTSIDERS):
        client, sender = f"198.18.{i // 200}.{i % 200 + 1}", f"bot{i}@spam{i}.example"
        sent = START + WEEK - 86400 + i * 60.0
        events += [event("policy", "greylisted", sent - 86_000 + n * 170,
                         detail="greylist: new triplet", client=client, sender=sender,
                         recipients=(f"user{n}@secumail.test",))
                   for n in range(OUTSIDER_RCPTS)]
        events += delivered(sent, {"client": client, "sender": sender, "recipients": (ALICE,)},
                            f"9B{i:08X}", f"m{i}@spam{i}.example")
    return sorted(events, key=lambda e: e.time)


def mail(count: int, rng: random.Random) -> Iterator[Event]:
    """`count` events of ordinary mail over the week, in time order (about: the collector
    stores each replica's events in the order it recorded them)."""
    providers = [f"209.85.{n // 250}.{n % 250 + 1}" for n in range(40)]  # busy: half the mail
    clients = [f"203.0.{n // 250}.{n % 250 + 1}" for n in range(3000)]
    senders = [f"user{n}@remote{n % 900}.example" for n in range(20_000)]
    locals_ = [ALICE, *(f"staff{n}@secumail.test" for n in range(1999))]
    weights = [1 / (n + 1) for n in range(len(locals_))]  # alice receives most
    messages = int(count / 5.85)  # the mix below: 5.85 events a message
    pending: list[tuple[float, int, list[Event]]] = []  # greylisted messages' retries
    made, serial = 0, itertools.count()
    for n in range(messages):
        at = START + WEEK * n / messages
        while pending and pending[0][0] <= at:
            for e in heapq.heappop(pending)[2]:
                yield e
                made += 1
        if made >= count:
            return
        if n % 50 == 0:
            sender = "news@letters.example"  # one busy sender: 2% of the mail
        else:
            sender = senders[int(rng.paretovariate(1.2)) % len(senders)]
        client = providers[n % 40] if rng.random() < 0.5 else rng.choice(clients)
        recipients = tuple(dict.fromkeys(rng.choices(locals_, weights,
                                                     k=rng.choice((1, 1, 1, 2, 3)))))
        who = {"client": client, "sender": sender, "recipients": recipients}
        queued, message_id = f"4{n:09X}", f"{n}.{rng.getrandbits(40):x}@{sender.split('@')[1]}"
        kind = rng.random()
        if kind < 0.80:
            path = delivered(at, who, queued, message_id)
        elif kind < 0.90:  # greylisted, retried 10 to 30 minutes later
            path = [event("policy", "greylisted", at, detail="greylist: new triplet", **who),
                    event("postfix", "greylisted", at + 0.01, detail="450 4.7.1", **who)]
            retry = at + rng.uniform(600, 1800)
            heapq.heappush(pending, (retry, next(serial),
                                     delivered(retry, who, queued, message_id)))
        elif kind < 0.95:
            path = [*delivered(at, who, queued, message_id)[:2],
                    event("spamd", "quarantined", at + 0.3, detail="score 9.1",
                          message_id=message_id, **who)]
        else:
            path = [event("policy", "refused", at, detail="dnsbl: listed", **who),
                    event("postfix", "refused", at + 0.01, detail="554 5.7.1", **who)]
        for e in path:
            yield e
            made += 1
    while pending and made < count:
        for e in heapq.heappop(pending)[2]:
            yield e
            made += 1


def fill(path: Path, count: int) -> None:
    store = TrackingStore(str(path), retention=WEEK + 86400, max_events=count + 1,
                          clock=lambda: START + WEEK)
    attack = outsider()
    rng = random.Random(30)
    stream = heapq.merge(mail(count - len(attack), rng), attack, key=lambda e: e.time)
    stored, started = 0, time.monotonic()
    for batch in iter(lambda: list(itertools.islice(stream, BATCH)), []):
        stored += len(batch)
        store.add("bench", stored, [StoredEvent(e, f"{e.service}-1") for e in batch])
        if stored % 200_000 < BATCH:
            print(f"  {stored:,} events stored ({time.monotonic() - started:.0f} s)",
                  flush=True)
    print(f"store: {store.count():,} events, {path.stat().st_size / MiB:.0f} MiB on disk, "
          f"filled in {time.monotonic() - started:.0f} s", flush=True)
    store.close()


def memory(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """VmHWM back to VmRSS (Linux: "5" to clear_refs), so that it is the search's peak."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def one_search(path: str, criteria: dict[str, Any], answer: Any) -> None:
    """In a fresh process: the search and its JSON as the API answers, timed; then again
    under tracemalloc."""
    store = TrackingStore(path, retention=WEEK + 86400, max_events=10**9,
                          clock=lambda: START + WEEK)
    store.count()  # the store open and its first page read, as in the gateway
    before = memory("VmRSS")
    reset_peak()
    started = time.perf_counter()
    found = store.find(Search(**criteria))
    body = json.dumps({"messages": [t.to_dict() for t in found.traces],
                       "truncated": bool(found.cut), "cut": found.why})
    seconds = time.perf_counter() - started
    peak = memory("VmHWM")
    tracemalloc.start()
    again = store.find(Search(**criteria))
    json.dumps([t.to_dict() for t in again.traces])
    heap = tracemalloc.get_traced_memory()[1] / MiB
    tracemalloc.stop()
    store.close()
    answer.put({"seconds": seconds, "rss": peak, "grew": peak - before, "heap": heap,
                "loaded": found.loaded, "messages": len(found.traces), "cut": found.cut,
                "bytes": len(body)})


def searches(path: Path) -> list[dict[str, Any]]:
    """Criteria worth timing: the outsider's recipient, sender and client, and ordinary
    ones, picked from the store (the busiest client and sender, one Message-ID...)."""
    store = TrackingStore(str(path), retention=WEEK + 86400, max_events=10**9)
    db = store.db
    middle = db.execute("SELECT max(id) / 2 FROM events").fetchone()[0]

    def one(query: str) -> tuple[Any, ...]:
        """The first row from the middle of the week on (an event of a day like any)."""
        row: tuple[Any, ...] = db.execute(query, (middle,)).fetchone()
        return row

    busy_client = db.execute("SELECT client FROM events WHERE client LIKE '209.85.%' "
                             "GROUP BY client ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    small_client = one("SELECT client FROM events WHERE id > ? AND client LIKE '203.0.%'")[0]
    sender = one("SELECT sender FROM events WHERE id > ? AND sender LIKE 'user%'")[0]
    message_id, queue_id = one("SELECT message_id, queue_id FROM events WHERE id > ? AND "
                               "queue_id != '' AND message_id != ''")
    staff = one("SELECT address FROM recipients WHERE event > ? AND address LIKE 'staff1%'")[0]
    store.close()
    return [
        {"recipient": ALICE, "limit": 50},
        {"recipient": ALICE, "limit": 500},
        {"sender": "bot0@spam0.example", "limit": 50},
        {"client": "198.18.0.1", "limit": 50},
        {"sender": "news@letters.example", "limit": 50},
        {"client": busy_client, "limit": 50},
        {"client": small_client, "limit": 50},
        {"sender": sender, "limit": 50},
        {"recipient": staff, "limit": 50},
        {"message_id": message_id, "limit": 50},
        {"queue_id": queue_id, "limit": 50},
        {"recipient": "nobody@secumail.test", "limit": 50},
        {"recipient": ALICE, "sender": "bot7@spam7.example", "limit": 50},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--keep", type=Path, help="a directory to fill once and keep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as scratch:
        directory = args.keep or Path(scratch)
        path = directory / "tracking.db"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            print(f"filling {path} with {args.events:,} events", flush=True)
            fill(path, args.events)
        context = multiprocessing.get_context("spawn")
        print(f"\n{'search':<58} {'s':>6} {'RSS':>6} {'+RSS':>6} {'heap':>6} "
              f"{'read':>6} {'msgs':>5}  cut")
        for criteria in searches(path):
            answer = context.Queue()
            process = context.Process(target=one_search, args=(str(path), criteria, answer))
            process.start()
            result = answer.get()
            process.join()
            label = " ".join(f"{k}={v}" for k, v in criteria.items())
            print(f"{label[:58]:<58} {result['seconds']:>6.2f} {result['rss']:>6.0f} "
                  f"{result['grew']:>6.1f} {result['heap']:>6.1f} {result['loaded']:>6} "
                  f"{result['messages']:>5}  {result['cut'] or '-'}", flush=True)
        print("\ns: seconds for the search and its JSON; RSS: the process's peak, MiB; +RSS: "
              "over the store open; heap: tracemalloc's peak, MiB; read: events loaded")


if __name__ == "__main__":
    main()
