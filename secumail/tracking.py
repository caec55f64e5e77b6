"""Message tracking: what each service decided about a message, as events.

Every SecuMail service keeps its recent events in memory (`EventLog`, a bounded ring:
recording one is an append, never I/O, so tracking can neither slow nor refuse
mail) and serves them on its metrics listener at `/events?after=SEQ`. The gateway collects
every replica's events into its own store (gateway/tracking.py) and answers the searches.
So the services hold no credentials and open no connection for tracking: the filters,
which read hostile content, stay on the one network they are on. An event the gateway did
not collect before the ring moved past it is lost, and counted as lost by the gateway.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from secumail.message import header_block_end, normalize_newlines

# What happened, in a word each service picks from (the detail says why):
#   passed      a check or a filter let it go on          greylisted  policy said 4xx, retry
#   refused     a 5xx to the sender (policy, a filter, Postfix, the milter)
#   deferred    a 4xx that is not greylisting (a backend down, Postfix's own retries)
#   accepted    Postfix queued it                         delivered   to a mailbox or a relay
#   quarantined / dropped   a filter kept or discarded it  bounced / expired   Postfix gave up
#   released    the admin let a quarantined message go on  (the gateway)
#   learned     SpamAssassin's Bayes was taught it as spam or ham, whatever it answered (the
#               gateway, the spamd filter: learning_event): a note on the message's path,
#               never where it ended
#   tls         Postfix's smtp client had a TLS session (or one in clear) with another
#               domain's MX: how it went, for TLS reports (secumail/tlsrpt.py); a note too
OUTCOMES = frozenset({
    "passed", "greylisted", "refused", "deferred", "accepted", "delivered", "quarantined",
    "dropped", "bounced", "expired", "released", "learned", "tls",
})
MAX_FIELD = 512  # characters per text field: events are for finding mail, not copies of it
MAX_RECIPIENTS = 50
DEFAULT_CAPACITY = 10_000
EVENTS_PER_ANSWER = 5000  # one collection of a busy replica in a few answers


class Event(NamedTuple):
    """One decision about a message. A tuple: cheap to make at every decision, and served
    as a JSON array in this field order (FIELDS), with no per-event dictionary."""

    service: str  # policy, clamav, spamd, dkim, postfix
    outcome: str  # one of OUTCOMES
    detail: str = ""  # the verdict, the check or the reply: why
    client: str = ""  # the connecting client's IP address (after XFORWARD: the real one)
    sender: str = ""
    recipients: tuple[str, ...] = ()
    queue_id: str = ""  # Postfix's id of the message as this hop saw it
    next_queue_id: str = ""  # the id the next hop gave it ("queued as ...")
    message_id: str = ""  # the Message-ID header, without its angle brackets
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = self._asdict()
        data["recipients"] = list(self.recipients)
        return data

    @classmethod
    def from_row(cls, row: list[Any]) -> Event:
        """An event from its JSON array (what /events serves); ValueError when malformed."""
        if not isinstance(row, list) or len(row) != len(FIELDS):
            raise ValueError("malformed event: not an array of the event's fields")
        recipients = row[5]
        if not isinstance(recipients, list):
            raise ValueError("recipients is not a list")
        if not isinstance(row[9], (int, float)) or isinstance(row[9], bool):
            raise ValueError("time is not a number")
        event = cls(_text(row[0]), _text(row[1]), _text(row[2]), _text(row[3]), _text(row[4]),
                    tuple(_text(r) for r in recipients[:MAX_RECIPIENTS]), _text(row[6]),
                    _text(row[7]), _text(row[8]), float(row[9]))
        if event.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {event.outcome!r}")
        return event


FIELDS = Event._fields


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value[:MAX_FIELD]


def event(service: str, outcome: str, detail: str = "", *, client: str = "", sender: str = "",
          recipients: tuple[str, ...] | list[str] = (), queue_id: str = "",
          next_queue_id: str = "", message_id: str = "", at: float | None = None) -> Event:
    """An event with its fields cut to size (a sender may write anything in a Message-ID).
    `at`: when the hop got the message, if not now (a filter answers after its next hop, but
    a path reads in the order the hops got it)."""
    assert outcome in OUTCOMES, outcome
    return new_event((
        service, outcome, detail[:MAX_FIELD], client[:MAX_FIELD], sender[:MAX_FIELD],
        (recipients[0][:MAX_FIELD],) if len(recipients) == 1
        else tuple([r[:MAX_FIELD] for r in recipients[:MAX_RECIPIENTS]]),
        queue_id_value(queue_id) if queue_id else "",
        queue_id_value(next_queue_id) if next_queue_id else "",
        message_id[:MAX_FIELD], time.time() if at is None else at))


# An Event from the tuple of its fields in FIELDS order, cut to size already: the tuple built
# directly, without a named tuple's constructor (a Python call more). For the policy
# service's answers, thousands a second, which cut their fields themselves.
new_event: Callable[[tuple[Any, ...]], Event] = functools.partial(tuple.__new__, Event)


# What a recorder answering thousands of times a second records instead of its Event: the
# function that makes the Event from this tuple, then the values it needs, taken as they are
# at the answer. The Event is made when events are served (EventLog.since), every 2 s in one
# pass, so that an answer spends no call, string or tuple more on tracking than this one
# (measured: bench/README.md, tracking_bench.py).
Pending = tuple[Any, ...]  # (make, *values): make(pending) -> Event


_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{5,32}$")


def queue_id_value(text: str) -> str:
    """A Postfix queue id, or "" for what stands in for none: before the queue, Postfix's
    XFORWARD says IDENT=NOQUEUE (or [UNAVAILABLE]) for every message, which must not make
    them one message."""
    return text if text and _QUEUE_ID.match(text) and text != "NOQUEUE" else ""


def _encode(answer: dict[str, Any]) -> bytes:
    """orjson: 0.1 us an event against the standard json module's 1.7 (measured here on
    policy events), at every collection of every replica. An Event, a named tuple, is
    written as the array of its fields. orjson refuses a string that is not valid Unicode (a
    lone surrogate, from bytes decoded with surrogateescape): such a page is written by the
    json module, which escapes it, so that one event cannot stop a replica's collection."""
    try:
        return orjson.dumps(answer, default=tuple)
    except orjson.JSONEncodeError:
        return json.dumps(answer, separators=(",", ":")).encode()


class EventLog:
    """The last `capacity` events of this process, numbered from 1. `boot` tells one run of
    the process from the next, whose numbers start again.

    Recording is an append and two counts, no lock and no object more per event (the
    policy service records at every answer, where each object and call shows in its rate:
    bench/README.md). Numbers are implied: the newest event held is number `recorded`.
    One thread of a process records (the event loop; in the Postfix container, the thread
    reading the log); `since` may run in another (the Postfix agent's): it copies the ring
    in one C call, so under the GIL never during an append, and the counts read before
    and after the copy tell whether an event was being recorded meanwhile (then it copies
    again). Pending records are made into events, and the JSON written, when events are
    served, in one pass and one call per answer."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, enabled: bool = True) -> None:
        self.boot = uuid.uuid4().hex
        self.enabled = enabled
        self._events: deque[Event | Pending] = deque(maxlen=capacity)
        self._started = self._recorded = 0

    def configure(self, capacity: int, enabled: bool) -> None:
        """At start, before anything records."""
        self._events = deque(self._events, maxlen=capacity)
        self.enabled = enabled

    def record(self, item: Event | Pending) -> None:
        if self.enabled:
            self._started += 1
            self._events.append(item)
            self._recorded += 1

    def since(self, after: int, limit: int = EVENTS_PER_ANSWER) -> bytes:
        """JSON: the events numbered above `after`, oldest first, at most `limit`, each
        `[number, [the event's FIELDS]]`. `first` is the oldest number still held: a
        collector that asked for after+1 and sees a higher `first` knows how many it
        missed."""
        while True:
            last = self._recorded
            held = list(self._events)
            if self._started == last:
                break
        first = last - len(held) + 1
        start = max(0, after + 1 - first)
        chosen = [] if after >= last else held[start:start + limit]
        chosen = [item if type(item) is Event else item[0](item) for item in chosen]
        return _encode({"boot": self.boot, "first": first, "last": last, "fields": FIELDS,
                        "events": list(zip(itertools.count(first + start), chosen))})


EVENTS = EventLog()  # this process's, as its metrics live in prometheus_client's registry


record = EVENTS.record  # bound once: a Python call less at every policy answer


_QUEUED_AS = re.compile(r"\bqueued as ([0-9A-Za-z]{5,32})\b")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def queued_as(reply: str) -> str:
    """The queue id in a next hop's "250 2.0.0 Ok: queued as 4XyZ..." reply, or ""."""
    found = _QUEUED_AS.search(reply)
    return found[1] if found else ""


def message_id_of(message: bytes, header_end: int) -> str:
    """The Message-ID of a message whose header block ends at `header_end`, unfolded and
    without its angle brackets ("" when it has none)."""
    found = _MESSAGE_ID.search(message, 0, header_end)
    return message_id_value(found[1].decode("utf-8", "replace")) if found else ""


def message_id_value(value: str) -> str:
    """A Message-ID header's value as events keep it: unfolded, without angle brackets."""
    return " ".join(value.split()).strip("<>")[:MAX_FIELD]


_RETURN_PATH = re.compile(rb"^return-path[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_DELIVERED_TO = re.compile(rb"^delivered-to[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
HEAD_MAX = 256 * 1024  # bytes of a message read for its header fields (a header is smaller)


def _head(message: bytes) -> bytes:
    """A message's header fields, line endings made CRLF (an uploaded or attached message
    may end its lines in LF only)."""
    head = normalize_newlines(message[:HEAD_MAX])
    return head[:header_block_end(head)]


def learned_result(kind: str, new: bool) -> str:
    """What spamd's TELL answered, in words: whether Bayes learned the message or knew it."""
    return f"learned as {kind}" if new else f"known as {kind} already"


def delivered_envelope(message: bytes) -> tuple[str, tuple[str, ...]]:
    """The envelope a delivered copy records in its topmost Return-Path and Delivered-To
    (written by the delivering agent, above what the sender wrote): ("", ()) without them."""
    head = _head(message)
    sender, recipient = _RETURN_PATH.search(head), _DELIVERED_TO.search(head)
    recipient_address = message_id_value(recipient[1].decode("utf-8", "replace")) \
        if recipient else ""
    return (message_id_value(sender[1].decode("utf-8", "replace")) if sender else "",
            (recipient_address,) if recipient_address else ())


def learning_event(service: str, kind: str, by: str, result: str, message: bytes, *,
                   client: str = "", sender: str = "", recipients: tuple[str, ...] = (),
                   queue_id: str = "", at: float | None = None) -> Event:
    """The event of one learning act (issue 29), of one shape wherever Bayes is taught (the
    gateway: a release, the admin's learning routes; the spamd filter: a user's report).
    `by`: who taught it and how ("the admin, releasing ID (console)", "bob@example.org,
    reporting it by mail"); `result`: what SpamAssassin answered (learned_result), or "not
    learned: why". Linked to the message's path by its Message-ID (read here), and by what
    the caller knows of its envelope (a quarantined message's record); without that, the
    envelope the delivered copy records (delivered_envelope)."""
    head = _head(message)
    if not sender and not recipients:
        sender, recipients = delivered_envelope(head)
    return event(service, "learned", f"{kind}, taught by {by}: {result}", client=client,
                 sender=sender, recipients=recipients, queue_id=queue_id,
                 message_id=message_id_of(head, len(head)), at=at)
