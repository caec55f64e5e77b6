"""A content filter's session and decisions without sockets: the envelope the session builds
and hands on, what it does with each verdict, and the plain decision functions. The same
behaviour through real sockets and real scanners: tests/service/test_filters.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secumail.filter.session import Filter, FilterSession, Relayed
from secumail.filter.verdicts import (
    Verdict,
    quarantine_full_reply,
    refusal_after_queue,
    retry_verdict,
)
from secumail.forwarded import ForwardedClient
from secumail.lostacks import STILL_AWAITED
from secumail.netaddr import HostPort, parse_network
from secumail.protocols.smtp import Envelope, SmtpClient, SmtpReply
from secumail.quarantine import Quarantine

MESSAGE = b"Message-ID: <m1@remote.test>\nSubject: hi\n\nbody\n"


@dataclass
class NextHop:
    """What the session sees of a next-hop connection: every command it was sent."""

    sent: list[tuple[str, object]] = field(default_factory=list)
    end_of_data: str = "250 2.0.0 Ok: queued as 4ABC"
    connected: bool = True
    reusable: bool = True
    delivered_unanswered: bool = False
    opened: float = field(default_factory=time.monotonic)

    async def mail(self, sender: str, options: list[str], client: dict[str, str]
                   ) -> SmtpReply:
        self.sent.append(("MAIL", (sender, list(options), dict(client))))
        return SmtpReply(250, ["2.1.0 Ok"])

    async def rcpt(self, recipient: str, options: list[str]) -> SmtpReply:
        self.sent.append(("RCPT", (recipient, list(options))))
        code = 550 if recipient.startswith("nobody@") else 250
        return SmtpReply(code, ["5.1.1 User unknown" if code == 550 else "2.1.5 Ok"])

    async def data(self, pieces: list[bytes | memoryview]) -> SmtpReply:
        self.sent.append(("DATA", b"".join(bytes(piece) for piece in pieces)))
        code, _, text = self.end_of_data.partition(" ")
        return SmtpReply(int(code), [text])

    async def command(self, line: str) -> SmtpReply:
        self.sent.append((line, None))
        return SmtpReply(250, ["2.0.0 Ok"])

    async def quit(self) -> None:
        self.connected = False

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.sent]


def world(tmp_path: Path, verdict: Verdict, before_queue: bool = True
          ) -> tuple[Filter, NextHop, list[Envelope]]:
    inspected: list[Envelope] = []

    async def inspect(envelope: Envelope, message: bytes) -> Verdict:
        inspected.append(envelope)
        return verdict

    filter = Filter("clamav", HostPort("127.0.0.1", 10026), inspect, "mx.secumail.test", 5.0,
                    Quarantine(tmp_path / "q"), 10, before_queue=before_queue,
                    mynetworks=[parse_network("192.0.2.0/24")])
    hop = NextHop()

    async def connect() -> SmtpClient | SmtpReply:
        return hop  # type: ignore[return-value]  # the fake stands for the client

    filter.connect = connect  # type: ignore[method-assign]
    return filter, hop, inspected


async def transaction(session: FilterSession, sender: str, *recipients: str,
                      message: bytes = MESSAGE) -> list[str]:
    session.xforward({"ADDR": "203.0.113.7", "IDENT": "9F00"})
    replies = [await session.mail(sender, ["BODY=8BITMIME"])]
    replies += [await session.rcpt(recipient, ["NOTIFY=NEVER"]) for recipient in recipients]
    return [*replies, await session.data(message)]


def test_one_envelope_from_mail_to_the_inspector_and_the_next_hop(tmp_path: Path) -> None:
    filter, hop, inspected = world(tmp_path, Verdict("deliver", "clean"))
    session = filter.open_session()
    assert session is not None
    replies = asyncio.run(transaction(session, "", "bob@secumail.test", "nobody@secumail.test"))
    assert replies[-1] == "250 2.0.0 Ok: queued as 4ABC"
    assert replies[2].startswith("550")  # the next hop's refusal, passed back as it came
    # The null sender is "" all the way; only the recipients the next hop took are in it.
    assert inspected == [Envelope("", ("bob@secumail.test",),
                                  {"ADDR": "203.0.113.7", "IDENT": "9F00"},
                                  ("BODY=8BITMIME",), (("NOTIFY=NEVER",),))]
    assert hop.sent[0] == ("MAIL", ("", ["BODY=8BITMIME"], {"ADDR": "203.0.113.7",
                                                             "IDENT": "9F00"}))
    delivered = hop.sent[-1][1]
    assert isinstance(delivered, bytes) and delivered.endswith(b"\r\n\r\nbody\r\n")
    assert b"X-SecuMail-Client:" in delivered  # before queue, for the milter behind us
    assert session.envelope is None and session.client == {}  # the transaction is over


def test_a_refusal_cancels_the_next_hops_transaction(tmp_path: Path) -> None:
    filter, hop, _ = world(tmp_path, Verdict("reject", "virus", "Eicar",
                                             reply="554 5.7.1 virus found"))
    session = filter.open_session()
    assert session is not None
    replies = asyncio.run(transaction(session, "a@remote.test", "bob@secumail.test"))
    assert replies[-1] == "554 5.7.1 virus found"
    assert hop.verbs() == ["MAIL", "RCPT", "RSET"]  # never DATA


def test_after_queue_a_refusal_from_outside_is_quarantined_with_its_envelope(
    tmp_path: Path,
) -> None:
    filter, hop, _ = world(tmp_path, Verdict("reject", "virus", "Eicar", reply="554 5.7.1 x"),
                           before_queue=False)
    session = filter.open_session()
    assert session is not None
    replies = asyncio.run(transaction(session, "", "bob@secumail.test"))
    assert replies[-1].startswith("250 2.0.0 Ok: quarantined as ")
    [record] = filter.quarantine.records()
    assert (record.mail_from, record.rcpt_tos, record.client["ADDR"]) == (
        "", ("bob@secumail.test",), "203.0.113.7")
    assert hop.verbs() == ["MAIL", "RCPT", "RSET"]


def test_a_known_retry_is_answered_not_delivered_again(tmp_path: Path) -> None:
    filter, hop, inspected = world(tmp_path, Verdict("deliver", "clean"))

    async def twice() -> list[str]:
        session = filter.open_session()
        assert session is not None
        first = await transaction(session, "a@remote.test", "bob@secumail.test")
        assert first[-1].startswith("250") and session.answered is not None
        session.closed(reset=True)  # the client vanished with our 250 unread
        again = filter.open_session()
        assert again is not None
        return await transaction(again, "a@remote.test", "bob@secumail.test")

    replies = asyncio.run(twice())
    assert replies[-1].startswith("250 2.0.0 Ok: discarded (delivered before")
    assert hop.verbs().count("DATA") == 1 and len(inspected) == 1


def test_the_connection_cap_and_the_drain_refuse_new_sessions(tmp_path: Path) -> None:
    filter, _, _ = world(tmp_path, Verdict("deliver", "clean"))
    filter.max_connections = 1
    first = filter.open_session()
    assert first is not None and filter.open_session() is None
    first.closed(reset=False)
    assert filter.connections == 0
    filter.draining = True
    assert filter.open_session() is None


def test_retry_verdicts() -> None:
    assert retry_verdict(None) is None
    awaited = retry_verdict(STILL_AWAITED)
    assert awaited is not None and awaited.action == "tempfail"
    assert awaited.reply.startswith("451")
    done = retry_verdict("250 2.0.0 Ok: queued as 4ABC")
    assert done is not None and done.action == "drop" and "4ABC" in done.reason


@pytest.mark.parametrize("client, action", [
    ({"ADDR": "203.0.113.7"}, "quarantine"),  # a bounce would go to a forged sender
    ({"ADDR": "192.0.2.9"}, "reject"),  # our own network's users get their bounce
])
def test_refusals_after_queue(client: dict[str, str], action: str) -> None:
    refused = Verdict("reject", "virus", "Eicar", reply="554 5.7.1 x")
    decided = refusal_after_queue(refused, ForwardedClient.from_xforward(client),
                                  [parse_network("192.0.2.0/24")])
    assert decided.action == action
    assert refusal_after_queue(Verdict("deliver", "clean"), ForwardedClient.from_xforward(
        client), []).action == "deliver"


def test_a_full_quarantine() -> None:
    assert quarantine_full_reply(True, "spam").startswith("452 4.3.1")
    assert quarantine_full_reply(False, "spam").startswith("250 2.0.0 Ok: discarded")


def test_the_key_of_a_relayed_message_ignores_its_headers() -> None:
    envelope = Envelope("a@remote.test", ("bob@secumail.test",))
    one = Relayed(envelope, b"Message-ID: <x@y>\r\nReceived: one\r\n\r\nbody\r\n")
    two = Relayed(envelope, b"Message-ID: <x@y>\r\nReceived: two\r\n\r\nbody\r\n")
    assert one.key == two.key and one.message_id == "x@y"
