"""Outbound limits without sockets: the limits' syntax, the buckets, the SQLite store, and the
policy engine counting our own hosts' mail (a fake clock, in-memory SQLite)."""

from __future__ import annotations

from typing import Any

import pytest

from secumail.greylist_store import SqliteStore
from secumail.outbound import (
    DEFAULT_OUTBOUND_LIMITS,
    Held,
    buckets,
    gcra,
    parse_limits,
    subjects,
)
from secumail.outbound_store import SqliteOutbound
from secumail.settings import Settings
from services.policy.engine import PolicyEngine
from testkit.fakes import FakeAsyncResolver, FakeClock, FakeResolver
from testkit.policy_client import rcpt_request

LOCAL = "127.0.0.5"  # in the default SECUMAIL_MYNETWORKS


def test_limits_parse_and_bad_ones_are_named() -> None:
    limits = parse_limits("sender:messages:100/hour, CLIENT:recipients:5/minute,,")
    assert [limit.text for limit in limits] == [
        "sender:messages:100/hour", "client:recipients:5/minute"]
    assert limits[1].seconds == 60
    assert parse_limits("") == []
    assert len(parse_limits(DEFAULT_OUTBOUND_LIMITS)) == 9
    for bad in ("sender:messages:100", "host:messages:1/hour", "sender:bytes:1/hour",
                "sender:messages:0/hour", "sender:messages:1/week"):
        with pytest.raises(ValueError, match="bad outbound limit"):
            parse_limits(bad)
    with pytest.raises(ValueError, match="bad outbound limit 'sender:messages:ten/hour'"):
        Settings(outbound_limits="sender:messages:ten/hour")


def test_a_bucket_lets_the_count_through_at_once_then_one_per_interval() -> None:
    tat, now = None, 1000.0
    interval, period = 3600 / 3, 3600  # 3/hour
    for _ in range(3):
        fits, tat = gcra(tat, now, interval, period)
        assert fits
    fits, after = gcra(tat, now, interval, period)
    assert not fits and after == tat  # nothing counted
    fits, _ = gcra(tat, now + 1199, interval, period)
    assert not fits
    fits, _ = gcra(tat, now + 1200, interval, period)
    assert fits  # a third of an hour later, one more
    assert gcra(tat, now + 10 * 3600, interval, period)[0]  # a bucket long empty


def test_which_counters_a_recipient_moves() -> None:
    limits = parse_limits("sender:messages:2/hour,sender:recipients:5/minute,"
                          "client:messages:9/day")
    found = subjects("127.0.0.5", "Alice@Example.org", "")
    assert found == [("client", "127.0.0.5"), ("sender", "alice@example.org")]
    assert subjects("127.0.0.5", "", "bob") == [("client", "127.0.0.5"), ("user", "bob")]
    first = buckets(limits, found, new_message=True)
    assert sorted(b.key for b in first) == [
        "l:client:messages:9/day:127.0.0.5", "l:sender:messages:2/hour:alice@example.org",
        "l:sender:recipients:5/minute:alice@example.org"]
    later = buckets(limits, found, new_message=False)
    assert [b.key for b in later] == ["l:sender:recipients:5/minute:alice@example.org"]
    tries = buckets(limits, found, new_message=True, attempts=True, factor=10)
    # Per-minute limits hold nobody: a queue run retrying a backlog is a burst of tries.
    assert sorted((b.key, b.interval) for b in tries) == [
        ("a:client:messages:9/day:127.0.0.5", 86400 / 90),
        ("a:sender:messages:2/hour:alice@example.org", 3600 / 20)]


async def test_the_sqlite_store_counts_all_or_nothing_and_holds() -> None:
    clock = FakeClock()
    store = SqliteOutbound(SqliteStore(":memory:"), clock)
    limits = parse_limits("client:messages:2/hour,client:recipients:3/hour")
    found = subjects(LOCAL, "", "")
    first = buckets(limits, found, True)
    assert (await store.charge(first, [], ["client:" + LOCAL])).over is None
    assert (await store.charge(buckets(limits, found, False), [], [])).over is None
    assert (await store.charge(first, [], [])).over is None  # 2 messages, 3 recipients
    recipients = "l:client:recipients:3/hour:" + LOCAL
    before = store.store.db.execute(
        "SELECT tat FROM outbound_buckets WHERE key = ?", (recipients,)).fetchone()
    over = await store.charge(first, [], [])
    assert over.over is not None and over.over.limit.text == "client:messages:2/hour"
    # The recipients bucket had room, but the refused request moved nothing.
    assert store.store.db.execute(
        "SELECT tat FROM outbound_buckets WHERE key = ?", (recipients,)).fetchone() == before
    clock.advance(1800)  # room for one message and one recipient again
    assert (await store.charge(first, [], [])).over is None

    held = Held("client:" + LOCAL, clock(), "over 10 times client:messages:2/hour")
    assert await store.hold(held) and not await store.hold(held)
    assert (await store.charge(first, [], ["client:" + LOCAL])).held == "client:" + LOCAL
    await store.mark_notified(held.subject)
    assert [h.notified for h in await store.holds()] == [True]
    assert await store.release(held.subject) and not await store.release(held.subject)
    assert await store.holds() == []


def make_engine(clock: FakeClock, store: SqliteStore, **overrides: Any) -> PolicyEngine:
    settings = Settings(hostname="mx.secumail.test", greylist_mode="all", spf_enabled=False,
                        **overrides)
    return PolicyEngine(settings, store, FakeResolver(),  # type: ignore[arg-type]
                        FakeAsyncResolver(), clock,  # type: ignore[arg-type]
                        outbound_store=SqliteOutbound(store, clock))


async def test_a_host_splitting_its_mail_over_many_senders_is_deferred_at_its_limit() -> None:
    """The attack: each message from a new sender address, to stay under the per-sender
    limit. The client's own limit stops it at exactly its count."""
    clock = FakeClock()
    engine = make_engine(clock, SqliteStore(":memory:"),
                         outbound_limits="sender:messages:5/hour,client:messages:3/hour")
    actions = []
    for n in range(5):
        request = rcpt_request(client_address=LOCAL, sender=f"s{n}@example.org",
                               recipient=f"r{n}@elsewhere.test", instance=f"m{n}")
        actions.append((await engine.evaluate(request)).action)
    assert actions[:3] == ["DUNNO"] * 3
    assert actions[3] == actions[4] == (
        f"450 4.7.1 Outbound limit reached: 3 messages per hour for client:{LOCAL}, please "
        "retry later")
    engine.close()


async def test_a_message_counts_once_and_each_recipient_counts() -> None:
    clock = FakeClock()
    engine = make_engine(clock, SqliteStore(":memory:"),
                         outbound_limits="sender:messages:1/hour,sender:recipients:3/hour")
    answers = [await engine.evaluate(rcpt_request(
        client_address=LOCAL, recipient=f"r{n}@elsewhere.test", instance="one"))
        for n in range(4)]
    assert [a.action for a in answers[:3]] == ["DUNNO"] * 3
    assert answers[3].action.startswith("450 4.7.1 Outbound limit reached: 3 recipients per "
                                        "hour for sender:alice@remote.test")
    assert answers[3].check == "outbound" and answers[3].kind == "tempfail"
    second = await engine.evaluate(rcpt_request(client_address=LOCAL, instance="two"))
    assert "1 messages per hour" in second.action
    engine.close()


async def test_inbound_mail_is_never_counted() -> None:
    clock = FakeClock()
    store = SqliteStore(":memory:")
    engine = make_engine(clock, store, outbound_limits="client:messages:1/hour",
                         greylist_enabled=False)
    for n in range(5):
        decision = await engine.evaluate(rcpt_request(instance=f"in{n}"))  # 203.0.113.7
        assert decision.action == "DUNNO"
    assert store.db.execute("SELECT COUNT(*) FROM outbound_buckets").fetchone()[0] == 0
    engine.close()


async def test_a_forged_sasl_user_from_outside_is_not_trusted() -> None:
    """The attack: a request from an outside client naming a SASL user, which SecuMail's
    Postfix (no SMTP AUTH) never sends: it is greylisted as any outside mail, and counts
    against no user. Trusted only when the admin says their Postfix checked it."""
    clock = FakeClock()
    engine = make_engine(clock, SqliteStore(":memory:"))
    forged = await engine.evaluate(rcpt_request(sasl_username="ceo", instance="f"))
    assert forged.check == "greylist" and forged.kind == "defer"
    trusting = make_engine(clock, SqliteStore(":memory:"), policy_trust_sasl=True,
                           outbound_limits="user:messages:1/hour")
    first = await trusting.evaluate(rcpt_request(sasl_username="ceo", instance="a"))
    assert (first.action, first.check) == ("DUNNO", "trusted")
    second = await trusting.evaluate(rcpt_request(sasl_username="ceo", instance="b"))
    assert "for user:ceo" in second.action
    engine.close()
    trusting.close()


async def test_a_sender_far_over_its_limit_is_held_until_released() -> None:
    clock = FakeClock()
    store = SqliteStore(":memory:")
    engine = make_engine(clock, store, outbound_limits="sender:messages:2/hour",
                         outbound_hold_factor="3")
    held: list[Held] = []
    engine.on_hold = held.append

    def send(n: int, sender: str = "spam@example.org") -> Any:
        return engine.evaluate(rcpt_request(client_address=LOCAL, sender=sender,
                                            instance=f"h{n}"))

    answers = [(await send(n)).action for n in range(7)]
    assert answers[:2] == ["DUNNO"] * 2
    assert all(a.startswith("450 4.7.1 Outbound limit reached") for a in answers[2:6])
    # The seventh try is past 3 x 2/hour: held, and said once.
    assert answers[6] == ("450 4.7.1 Outbound mail held for sender:spam@example.org (far "
                          "over its limits): ask the postmaster to release it")
    assert [h.subject for h in held] == ["sender:spam@example.org"]
    clock.advance(7200)  # the limit has room again; the hold stays
    assert (await send(8)).action.startswith("450 4.7.1 Outbound mail held")
    assert (await send(9, "other@example.org")).action == "DUNNO"
    assert len(held) == 1
    assert engine.outbound_store is not None
    assert await engine.outbound_store.release("sender:spam@example.org")
    assert (await send(10)).action == "DUNNO"
    engine.close()


async def test_no_limits_no_counting() -> None:
    clock = FakeClock()
    store = SqliteStore(":memory:")
    engine = make_engine(clock, store, outbound_limits="")
    decision = await engine.evaluate(rcpt_request(client_address=LOCAL))
    assert (decision.action, decision.check) == ("DUNNO", "trusted")
    engine.close()


async def test_the_admin_is_told_of_a_hold_once_and_again_if_the_mail_was_refused() -> None:
    from email import message_from_bytes

    from gateway.outbound_notice import HoldNotifier
    from secumail.protocols.smtp import SmtpReply

    settings = Settings(domains="secumail.test", admin_address="Boss@Secumail.test")
    store = SqliteOutbound(SqliteStore(":memory:"))
    sent: list[tuple[str, bytes]] = []
    replies = [SmtpReply(451, ("4.3.0 try later",)), SmtpReply(250, ("2.0.0 Ok",))]

    async def send(recipient: str, message: bytes) -> SmtpReply:
        sent.append((recipient, message))
        return replies.pop(0)

    notifier = HoldNotifier(settings, lambda: store, send)
    assert await notifier.notify() == 0  # nothing held
    await store.hold(Held("client:127.0.0.9", 1_800_000_000.0,
                          "over 10 times client:messages:500/hour"))
    assert await notifier.notify() == 0 and len(sent) == 1  # refused: not marked told
    assert await notifier.notify() == 1 and len(sent) == 2
    assert await notifier.notify() == 0 and len(sent) == 2  # told once
    recipient, raw = sent[-1]
    notice = message_from_bytes(raw)
    assert recipient == "boss@secumail.test" == notice["To"]
    assert notice["Subject"] == "SecuMail held outbound mail of client:127.0.0.9"
    body = " ".join(notice.get_payload().split())  # wrapped at 72
    assert "over 10 times client:messages:500/hour" in body
    assert "DELETE /admin/outbound/held/client:127.0.0.9" in body
    assert [h.notified for h in await store.holds()] == [True]
