"""Message tracking without sockets: the events each service records, Postfix's log lines as
events, the ring the gateway collects from, the store, and messages rebuilt from events."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from dataclasses import replace
from typing import Any

import httpx2
import pytest
from prometheus_client import CollectorRegistry

from gateway.scrape import Target
from gateway.tracking import (
    Collector,
    Search,
    StoredEvent,
    TrackingMetrics,
    TrackingStore,
    build_traces,
)
from secumail import tracking
from secumail.filter.verdicts import Verdict, verdict_event
from secumail.greylist_store import SqliteStore
from secumail.metrics import BAD_CURSOR, MetricsAnswers
from secumail.protocols.http import Request
from secumail.protocols.smtp import Envelope
from secumail.settings import Settings
from secumail.tracking import Event, EventLog
from services.policy.engine import Decision
from services.policy.server import PolicyService
from services.postfix.events import PostfixEvents
from testkit.policy_client import rcpt_request

# --- what the services record ------------------------------------------------------------


def since(ring: EventLog, after: int, limit: int = 5000) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(ring.since(after, limit))
    return answer


def test_the_ring_numbers_events_and_says_how_many_it_no_longer_holds() -> None:
    ring = EventLog(capacity=100)
    for n in range(250):
        ring.record(tracking.event("policy", "passed", f"n={n}"))
    answer = since(ring, 0, limit=10)
    assert (answer["first"], answer["last"]) == (151, 250)  # 150 are gone
    assert [e[0] for e in answer["events"]] == list(range(151, 161))
    assert since(ring, 245)["events"][0][1][tracking.FIELDS.index("detail")] == "n=245"
    assert since(ring, 250)["events"] == [] and since(ring, 10**9)["events"] == []
    assert EventLog().boot != ring.boot  # a restarted process is told apart


def test_a_ring_read_from_another_thread_while_recording_sees_every_number_once() -> None:
    # The Postfix container records from its log reader's thread and serves from the agent's;
    # the ring has no lock (secumail/tracking.py says why).
    ring = EventLog(capacity=1000)
    done = threading.Event()

    def write() -> None:
        for n in range(200_000):
            ring.record(tracking.event("postfix", "accepted", f"n={n}"))
        done.set()

    writer = threading.Thread(target=write)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can
    writer.start()
    try:
        after, seen, missed = 0, 0, 0
        while not done.is_set() or after < 200_000:
            answer = since(ring, after, limit=300)
            numbers = [number for number, _ in answer["events"]]
            if numbers:
                assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
                assert numbers[0] == max(after + 1, answer["first"])
                assert all(row[2] == f"n={number - 1}" for number, row in answer["events"])
                missed += numbers[0] - after - 1
                seen += len(numbers)
                after = numbers[-1]
        writer.join()
    finally:
        sys.setswitchinterval(switch)
    assert seen + missed == 200_000 and seen > 1000


def test_a_disabled_ring_records_nothing() -> None:
    ring = EventLog(enabled=False)
    ring.record(tracking.event("policy", "passed"))
    assert since(ring, 0)["last"] == 0


def test_a_string_that_is_not_unicode_does_not_stop_the_collection() -> None:
    ring = EventLog()
    ring.record(tracking.event("clamav", "passed", sender="caf\udce9@example.org"))  # 8-bit
    ring.record(tracking.event("clamav", "passed", sender="na\u00efve@example.org"))
    senders = [Event.from_row(row).sender for _, row in since(ring, 0)["events"]]
    assert senders == ["caf\udce9@example.org", "na\u00efve@example.org"]
    assert since(ring, 1)["events"][0][1][4] == "na\u00efve@example.org"  # orjson's page


def test_events_answer_refuses_a_bad_cursor() -> None:
    ring = EventLog()
    ring.record(tracking.event("dkim", "passed"))
    answers = MetricsAnswers(ring, [])
    for bad in ("after=x", "after=-1", f"after={2**64}"):
        assert asyncio.run(answers(Request("GET", "/events", bad, "127.0.0.1"))) == BAD_CURSOR
    status, body, _ = asyncio.run(answers(Request("GET", "/events", "after=0", "127.0.0.1")))
    answer = json.loads(body)
    [[seq, row]] = answer["events"]
    assert status == "200 OK" and row[answer["fields"].index("service")] == "dkim" and seq == 1


def test_fields_are_cut_to_size_and_malformed_events_refused() -> None:
    big = tracking.event("clamav", "refused", "x" * 10_000, message_id="m" * 10_000,
                         recipients=[f"r{i}@x.test" for i in range(500)])
    assert len(big.detail) == tracking.MAX_FIELD and len(big.recipients) == 50
    row = json.loads(json.dumps(big))  # as /events serves it
    assert Event.from_row(row) == big
    for bad in (["x"], [*row[:1], "owned", *row[2:]], [*row[:5], "a@b", *row[6:]],
                [*row[:4], 5, *row[5:]], [*row[:9], "now"], {"service": "x"}):
        with pytest.raises(ValueError):
            Event.from_row(bad)  # type: ignore[arg-type]


def test_queue_ids_and_message_ids_are_read_from_replies_and_headers() -> None:
    assert tracking.queued_as("250 2.0.0 Ok: queued as 4ABC12DEF3") == "4ABC12DEF3"
    assert tracking.queued_as("250 2.0.0 Ok: quarantined as 123") == ""
    message = b"Subject: x\r\nMessage-ID:\r\n <abc@mail.remote.test>\r\n\r\nMessage-ID: <no>\r\n"
    assert tracking.message_id_of(message, message.index(b"\r\n\r\n") + 2) == \
        "abc@mail.remote.test"
    assert tracking.message_id_of(b"Subject: x\r\n\r\n", 13) == ""


@pytest.mark.parametrize(("action", "check", "outcome"), [
    ("DEFER_IF_PERMIT 4.7.1 Greylisted, see ...", "greylist", "greylisted"),
    ("451 4.3.0 spf unavailable", "spf", "deferred"),
    ("554 5.7.1 Service unavailable; client [192.0.2.9] blocked using rbl.test", "dnsbl",
     "refused"),
    ("550 5.7.23 SPF fail", "spf", "refused"),
    ("PREPEND X-Greylist: not delayed", "greylist", "passed"),
    ("DUNNO", "none", "passed"),
])
def test_each_policy_answer_is_one_event(action: str, check: str, outcome: str) -> None:
    found = answered(Decision(action, check, "why"), rcpt_request(client_address="192.0.2.9"))
    assert (found.service, found.outcome, found.client, found.recipients) == (
        "policy", outcome, "192.0.2.9", ("bob@secumail.test",))
    assert found.detail == f"{check}: why"


def test_a_policy_event_is_cut_to_size() -> None:
    found = answered(Decision("DUNNO", "none", "w" * 3000), rcpt_request(
        sender="s" * 3000, recipient="r" * 3000, queue_id="NOQUEUE"))
    assert (len(found.sender), len(found.recipients[0]), len(found.detail)) == (512, 512, 512)
    assert found.queue_id == "" and found.time > 0
    assert Event.from_row(json.loads(json.dumps(found))) == found


def answered(decision: Decision, request: dict[str, str]) -> Event:
    """The event the policy service serves for one answer it gave: what its answer recorded
    (tracking.Pending), made into an event by tracking.EVENTS.since as the collector reads."""
    service = PolicyService(Settings(hostname="mx.secumail.test"), store=SqliteStore(":memory:"))

    async def decide(_: dict[str, str]) -> Decision:
        return decision

    service.engine.evaluate = decide  # type: ignore[method-assign]
    before = tracking.EVENTS.since(0)
    asyncio.run(service.answer(request))
    service.engine.close()
    answer = json.loads(tracking.EVENTS.since(json.loads(before)["last"]))
    [(_, row)] = answer["events"]
    return Event.from_row(row)


@pytest.mark.parametrize(("verdict", "reply", "outcome", "next_id"), [
    (Verdict("deliver", "clean", ""), "250 2.0.0 Ok: queued as 4XYZ0001", "passed", "4XYZ0001"),
    (Verdict("reject", "virus", "Eicar", reply="554 5.7.0 virus"), "554 5.7.0 virus",
     "refused", ""),
    (Verdict("quarantine", "spam", "score 9"), "250 2.0.0 Ok: quarantined as q1 (score 9)",
     "quarantined", ""),
    (Verdict("drop", "spam", "score 30"), "250 2.0.0 Ok: discarded", "dropped", ""),
    (Verdict("deliver", "clean", ""), "451 4.4.1 next hop down", "deferred", ""),
    (Verdict("quarantine", "virus", "x"), "451 4.3.0 Quarantine unavailable", "deferred", ""),
])
def test_each_filter_verdict_is_one_event(verdict: Verdict, reply: str, outcome: str,
                                          next_id: str) -> None:
    info = Envelope("a@remote.test", ("bob@secumail.test",),
                       {"ADDR": "203.0.113.7", "IDENT": "4ABC12"})
    message = b"Message-Id: <m1@remote.test>\r\nSubject: s\r\n\r\nbody\r\n"
    found = verdict_event("clamav", info, message, verdict, reply)
    assert (found.outcome, found.next_queue_id, found.queue_id, found.client) == (
        outcome, next_id, "4ABC12", "203.0.113.7")
    assert found.message_id == "m1@remote.test" and verdict.label in found.detail


# --- Postfix's log ------------------------------------------------------------------------

P = "Dec  2 06:00:00 mx postfix/"


def feed(lines: list[str]) -> list[Event]:
    events = PostfixEvents("clamav", clock=lambda: 1000.0)
    return [e for line in lines if (e := events.feed(P + line)) is not None]


def test_postfix_refusals_at_rcpt_are_events_with_the_client() -> None:
    found = feed([
        "smtpd[11]: NOQUEUE: reject: RCPT from unknown[203.0.113.20]: 554 5.7.1 "
        "<carol@elsewhere.test>: Relay access denied; from=<alice@remote.test> "
        "to=<carol@elsewhere.test> proto=ESMTP helo=<mail.remote.test>",
        "smtpd[11]: NOQUEUE: reject: RCPT from unknown[203.0.113.21]: 450 4.7.1 "
        "<dave@secumail.test>: Recipient address rejected: Greylisted, see x; "
        "from=<bot@remote.test> to=<dave@secumail.test> proto=ESMTP helo=<x>",
    ])
    assert [(e.outcome, e.client, e.sender, e.recipients) for e in found] == [
        ("refused", "203.0.113.20", "alice@remote.test", ("carol@elsewhere.test",)),
        ("greylisted", "203.0.113.21", "bot@remote.test", ("dave@secumail.test",)),
    ]
    assert "Relay access denied" in found[0].detail


def test_before_queue_a_message_is_accepted_queued_and_delivered() -> None:
    found = feed([
        "smtpd[12]: connect from unknown[203.0.113.5]",
        "smtpd[12]: NOQUEUE: proxy-accept: END-OF-MESSAGE: 250 2.0.0 Ok: queued as 4QID2; "
        "from=<alice@remote.test> to=<dave@secumail.test> proto=ESMTP helo=<mail.remote.test>",
        "smtpd[13]: 4QID2: client=unknown[203.0.113.5]",
        "cleanup[14]: 4QID2: message-id=<m1@remote.test>",
        "qmgr[15]: 4QID2: from=<alice@remote.test>, size=900, nrcpt=1 (queue active)",
        "virtual[16]: 4QID2: to=<dave@secumail.test>, relay=virtual, delay=0.1, "
        "delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to maildir)",
        "qmgr[15]: 4QID2: from=<alice@remote.test>, size=900, nrcpt=1 (queue active)",
        "smtpd[12]: NOQUEUE: proxy-reject: END-OF-MESSAGE: 554 5.7.0 virus found; "
        "from=<alice@remote.test> to=<dave@secumail.test> proto=ESMTP helo=<x>",
    ])
    assert [(e.outcome, e.queue_id, e.next_queue_id) for e in found] == [
        ("accepted", "", "4QID2"), ("accepted", "4QID2", ""), ("delivered", "4QID2", ""),
        ("refused", "", ""),
    ]
    assert found[0].client == "203.0.113.5" == found[3].client  # from smtpd[12]'s connect
    assert found[2].message_id == "m1@remote.test" and found[2].sender == "alice@remote.test"
    assert found[2].recipients == ("dave@secumail.test",)


def test_after_queue_the_hand_over_to_the_filters_is_a_pass() -> None:
    found = feed([
        "smtp[20]: 4QID1: to=<dave@secumail.test>, relay=clamav[172.29.125.4]:10025, "
        "delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4QID9)",
        "smtp[21]: 4QID3: to=<x@remote.test>, relay=none, delay=1, delays=0/0/1/0, "
        "dsn=4.4.1, status=deferred (connect to remote.test[192.0.2.1]:25: timed out)",
        "smtp[21]: 4QID4: to=<y@remote.test>, relay=mx.remote.test[192.0.2.2]:25, delay=1, "
        "delays=0/0/0/1, dsn=5.1.1, status=bounced (host said: 550 5.1.1 no such user)",
    ])
    assert [(e.outcome, e.next_queue_id) for e in found] == [
        ("passed", "4QID9"), ("deferred", ""), ("bounced", "")]


# --- messages rebuilt from events -----------------------------------------------------------


def stored(n: int, service: str, outcome: str, at: float, **fields: Any) -> StoredEvent:
    base = {"client": "203.0.113.5", "sender": "alice@remote.test",
            "recipients": ("dave@secumail.test",)}
    return StoredEvent(tracking.event(service, outcome, **{**base, **fields})._replace(time=at),
                       f"{service}-1", n)


def greylisted_then_delivered() -> list[StoredEvent]:
    return [
        stored(1, "policy", "greylisted", 100.0),
        stored(2, "postfix", "greylisted", 100.1),
        stored(3, "policy", "passed", 400.0),
        stored(4, "clamav", "passed", 400.2, next_queue_id="4Q2AB7", message_id="m1@x"),
        stored(5, "spamd", "passed", 400.3, next_queue_id="4Q2AB7", message_id="m1@x"),
        stored(6, "postfix", "accepted", 400.4, next_queue_id="4Q2AB7"),
        stored(7, "dkim", "passed", 400.35, queue_id="4Q2AB7", message_id="m1@x"),
        stored(8, "postfix", "delivered", 400.6, queue_id="4Q2AB7", message_id="m1@x"),
    ]


def test_a_greylisted_message_and_its_delivery_are_one_path() -> None:
    traces = build_traces(greylisted_then_delivered())
    assert len(traces) == 1
    assert [e.id for e in traces[0].events] == [1, 2, 3, 4, 5, 7, 6, 8]
    assert traces[0].outcome == "delivered"
    summary = traces[0].to_dict()
    assert summary["queue_ids"] == ["4Q2AB7"] and summary["message_id"] == "m1@x"


def test_refusals_before_a_queue_id_stand_alone_or_with_their_own_retries() -> None:
    events = [
        stored(1, "policy", "greylisted", 100.0, client="192.0.2.9", sender="bot@x.test"),
        stored(2, "policy", "greylisted", 200.0, client="192.0.2.9", sender="bot@x.test"),
        stored(3, "postfix", "refused", 300.0, recipients=("carol@elsewhere.test",)),
        *greylisted_then_delivered()[3:],
    ]
    traces = build_traces(events)
    outcomes = sorted((t.outcome, len(t.events)) for t in traces)
    assert outcomes == [("delivered", 5), ("greylisted", 2), ("refused", 1)]


# A spam as a user's mailbox holds it (LF line endings, as an attachment gives it): the
# delivering agent's Return-Path and Delivered-To on top of what the sender wrote.
DELIVERED_SPAM = (b"Return-Path: <bounce@offers.test>\nDelivered-To: dave@secumail.test\n"
                  b"Return-Path: <forged@else.test>\nSubject: pills\nMessage-ID:\n"
                  b" <s1@offers.test>\n\nMessage-ID: <body@x>\n")


def test_a_learning_act_is_one_event_linked_to_its_message() -> None:
    """Issue 29: one shape for every learning act, the gateway's and the spamd filter's."""
    learned = tracking.learning_event("spamd", "spam", "dave@secumail.test, reporting it by "
                                      "mail", tracking.learned_result("spam", True),
                                      DELIVERED_SPAM, at=5.0)
    assert learned == Event(
        "spamd", "learned", "spam, taught by dave@secumail.test, reporting it by mail: "
        "learned as spam", "", "bounce@offers.test", ("dave@secumail.test",), "", "",
        "s1@offers.test", 5.0)
    assert Event.from_row(json.loads(json.dumps(learned))) == learned  # served, collected
    # What the caller knows of the envelope (a quarantine record) wins over the headers.
    kept = tracking.learning_event(
        "gateway", "ham", "the admin", "not learned: spamd down", DELIVERED_SPAM,
        client="203.0.113.7", sender="alice@remote.test", recipients=("bob@secumail.test",),
        queue_id="4Q2AB7")
    assert (kept.outcome, kept.detail) == ("learned",
                                           "ham, taught by the admin: not learned: spamd down")
    assert (kept.client, kept.sender, kept.recipients, kept.queue_id, kept.message_id) == (
        "203.0.113.7", "alice@remote.test", ("bob@secumail.test",), "4Q2AB7",
        "s1@offers.test")
    assert tracking.learned_result("ham", False) == "known as ham already"
    bare = tracking.learning_event("gateway", "spam", "x", "y", b"Subject: no ids\r\n\r\n")
    assert (bare.sender, bare.recipients, bare.message_id) == ("", (), "")


def test_learning_notes_a_path_but_is_not_where_the_message_ended() -> None:
    delivered = greylisted_then_delivered()
    reported = stored(9, "spamd", "learned", 900.0, message_id="m1@x", client="",
                      detail="spam, taught by dave@secumail.test, reporting it by mail: "
                      "learned as spam")
    [trace] = build_traces([*delivered, reported])
    assert trace.events[-1] is reported and trace.outcome == "delivered"
    kept = stored(1, "spamd", "quarantined", 100.0, message_id="k@x")
    released = stored(2, "gateway", "released", 200.0, message_id="k@x")
    taught = stored(3, "gateway", "learned", 200.1, message_id="k@x")
    assert build_traces([kept, taught])[0].outcome == "quarantined"
    assert build_traces([kept, released, taught])[0].outcome == "released"
    assert build_traces([stored(1, "gateway", "learned", 1.0, message_id="up@x")]
                        )[0].outcome == "learned"  # an uploaded message, never seen


def test_the_gateways_own_events_are_stored_without_a_cursor() -> None:
    store = TrackingStore(":memory:", retention=86400, max_events=10_000, clock=lambda: 500.0)
    store.add("boot1", 8, greylisted_then_delivered())
    store.add_own([stored(0, "gateway", "learned", 950.0, message_id="m1@x")])
    [trace] = store.search(Search(message_id="m1@x"))
    assert [e.event.outcome for e in trace.events][-2:] == ["delivered", "learned"]
    assert trace.events[-1].replica == "gateway-1" and store.cursor("boot1") == 8


def test_the_store_finds_a_message_by_any_of_its_fields() -> None:
    store = TrackingStore(":memory:", retention=86400, max_events=10_000, clock=lambda: 500.0)
    store.add("boot1", 8, greylisted_then_delivered())
    for search in (Search(recipient="DAVE@secumail.test"), Search(sender="alice@remote.test"),
                   Search(client="203.0.113.5"), Search(message_id="<m1@x>"),
                   Search(queue_id="4Q2AB7")):
        traces = store.search(search)
        assert len(traces) == 1, search
        assert traces[0].outcome == "delivered" and len(traces[0].events) == 8, search
    assert store.search(Search(sender="nobody@remote.test")) == []
    assert store.search(Search(queue_id="4Q2AB7", until=300.0)) == []
    assert store.cursor("boot1") == 8 and store.cursor("other") == 0


def test_the_store_keeps_its_retention_and_its_count() -> None:
    now = [1000.0]
    store = TrackingStore(":memory:", retention=100, max_events=1000, clock=lambda: now[0])
    store.add("b", 1500, [stored(0, "policy", "passed", 850.0 + i / 10) for i in range(1500)])
    now[0] = 1000.0 + 40  # events before 940 are past the retention
    assert store.prune() == 900 + 0 and store.count() == 600
    store.add("b", 2700, [stored(0, "policy", "passed", 1040.0) for _ in range(1200)])
    store.prune()
    assert store.count() == 1000


# --- the collector --------------------------------------------------------------------------


class Replica:
    """A replica's /events, as secumail.metrics serves it, over httpx2's mock transport."""

    def __init__(self) -> None:
        self.ring = EventLog(capacity=100)
        self.asked: list[int] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        after = int(request.url.params["after"])
        self.asked.append(after)
        return httpx2.Response(200, content=self.ring.since(after, limit=30))


async def no_name(host: str) -> str | None:
    return None  # no reverse DNS here: the tests send no query anywhere


def collect(store: TrackingStore, replica: Replica, metrics: TrackingMetrics,
            collector: Collector | None = None) -> int:
    async def run() -> int:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(replica.handle)) as client:
            async def targets() -> list[Target]:
                return [Target("policy", "10.0.0.2:9100", "policy-1")]
            used = collector or Collector(store, client, targets, metrics, 1.0, no_name)
            used.client = client
            return await used.collect()
    return asyncio.run(run())


def test_events_are_named_by_the_process_that_made_them_not_by_its_address() -> None:
    """Issue 32: `up -d` recreated policy and dkim, and they swapped addresses; the
    gateway kept naming what answered at policy's old address `policy-1`, for good. A new
    process at an address is named anew, by Docker's DNS at that moment."""
    store = TrackingStore(":memory:", retention=86400, max_events=10_000)
    names = {"10.0.0.2": "secumail-policy-1"}

    async def namer(host: str) -> str | None:
        return names.get(host)

    async def targets() -> list[Target]:  # /health's name, from before the swap
        return [Target("policy", "10.0.0.2:9100", "secumail-policy-1")]

    collector = Collector(store, httpx2.AsyncClient(), targets,
                          TrackingMetrics(CollectorRegistry()), 1.0, namer)
    replica = Replica()
    replica.ring.record(tracking.event("policy", "passed", "before"))
    assert collect(store, replica, TrackingMetrics(CollectorRegistry()), collector) == 1
    names["10.0.0.2"] = "secumail-dkim-1"  # recreated: dkim now has policy's old address
    replica.ring = EventLog(capacity=100)  # a new process answers there (a new boot)
    replica.ring.record(tracking.event("dkim", "passed", "after"))
    replica.ring.record(tracking.event("dkim", "passed", "after, again"))
    assert collect(store, replica, TrackingMetrics(CollectorRegistry()), collector) == 2
    rows = store.db.execute("SELECT detail, replica FROM events ORDER BY id").fetchall()
    assert rows == [("before", "secumail-policy-1"), ("after", "secumail-dkim-1"),
                    ("after, again", "secumail-dkim-1")]


def value(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name, {"service": "policy"}) or 0.0


def test_the_collector_stores_each_event_once_and_counts_what_it_missed() -> None:
    registry = CollectorRegistry()
    metrics = TrackingMetrics(registry)
    store = TrackingStore(":memory:", retention=86400, max_events=10_000)
    replica = Replica()
    for n in range(70):
        replica.ring.record(tracking.event("policy", "passed", f"n={n}"))
    assert collect(store, replica, metrics) == 70  # three pages of 30
    assert collect(store, replica, metrics) == 0  # a new collector (a restarted gateway)
    for n in range(150):  # more than the ring holds before the next collection
        replica.ring.record(tracking.event("policy", "passed", f"m={n}"))
    assert collect(store, replica, metrics) == 100
    assert store.count() == 170
    assert value(registry, "secumail_tracking_events_lost_total") == 50
    assert value(registry, "secumail_tracking_events_collected_total") == 170
    replica.ring = EventLog(capacity=100)  # the replica restarted: numbers start again
    replica.ring.record(tracking.event("policy", "refused", "again"))
    assert collect(store, replica, metrics) == 1


def test_a_replica_that_answers_junk_is_counted_and_the_others_go_on() -> None:
    registry = CollectorRegistry()
    store = TrackingStore(":memory:", retention=86400, max_events=10_000)

    def handle(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=b"not json")

    async def run() -> int:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(handle)) as client:
            async def targets() -> list[Target]:
                return [Target("policy", "10.0.0.2:9100")]
            return await Collector(store, client, targets, TrackingMetrics(registry),
                                   1.0, no_name).collect()

    assert asyncio.run(run()) == 0
    assert value(registry, "secumail_tracking_collect_errors_total") == 1


def test_what_stands_in_for_no_queue_id_links_nothing() -> None:
    """Before the queue Postfix's XFORWARD says IDENT=NOQUEUE for every message: two
    unrelated messages must not become one (the compose suite caught it)."""
    info = Envelope("a@remote.test", ("bob@secumail.test",), {"ADDR": "203.0.113.7",
                                                                  "IDENT": "NOQUEUE"})
    found = [verdict_event("clamav", replace(info, mail_from=f"s{n}@remote.test"),
                           f"Message-ID: <{n}@x>\r\n\r\n".encode(),
                           Verdict("reject", "virus", "x", reply="554 5.7.0 virus"),
                           "554 5.7.0 virus") for n in range(2)]
    assert [e.queue_id for e in found] == ["", ""]
    for ident in ("[UNAVAILABLE]", "NOQUEUE", "x" * 40, "4ab"):
        assert tracking.event("clamav", "passed", queue_id=ident).queue_id == ""
    traces = build_traces([StoredEvent(e, "clamav-1", n + 1) for n, e in enumerate(found)])
    assert len(traces) == 2


def test_a_refusal_by_the_filters_is_one_path_with_postfixs_word_on_it() -> None:
    """Before the queue: the policy's pass at RCPT, the filter's verdict (dated when it got
    the message), then Postfix's proxy-reject, logged once the filters answered."""
    events = [
        stored(1, "policy", "passed", 100.0),
        stored(2, "clamav", "refused", 100.2, message_id="v1@x"),
        stored(3, "postfix", "refused", 101.5),
        stored(4, "postfix", "refused", 100.0 + 3600, recipients=("other@secumail.test",)),
    ]
    traces = build_traces(events)
    assert sorted(len(t.events) for t in traces) == [1, 3]
    assert [e.id for e in max(traces, key=lambda t: len(t.events)).events] == [1, 2, 3]


def test_only_the_readers_may_read_a_services_events() -> None:
    """/events holds addresses: the gateway reads it, the other hosts on the network not."""
    ring = EventLog()
    ring.record(tracking.event("policy", "greylisted", sender="a@remote.test"))
    answers = MetricsAnswers(ring, ["192.0.2.10"])
    for peer, expected in (("192.0.2.10", "200 OK"), ("127.0.0.1", "200 OK"),
                           ("192.0.2.11", "403 Forbidden"), ("", "403 Forbidden")):
        status, body, _ = asyncio.run(answers(Request("GET", "/events", "after=0", peer)))
        assert status == expected, peer
        assert (b"a@remote.test" in body) == (expected == "200 OK"), peer
