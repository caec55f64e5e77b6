"""Outbound limits on the running stack (issue 34): Postfix as rendered asks the policy
service about our own hosts' mail, the counters live in the stack's Redis, the gateway lists
a held sender, mails the admin once and releases it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_gateway import Gateway
from tests.e2e.test_stack import attempt

LIMITS = {"SECUMAIL_E2E_OUTBOUND_LIMITS": "sender:messages:3/hour,client:messages:1000/hour",
          "SECUMAIL_E2E_OUTBOUND_HOLD_FACTOR": "2"}


@pytest.fixture
def small_limits(stack: Stack) -> Iterator[Gateway]:
    os.environ.update(LIMITS)
    try:
        stack.recreate(("policy",))
        yield Gateway(stack)
    finally:
        for name in LIMITS:
            os.environ.pop(name, None)
        stack.recreate(("policy",))


def test_a_host_of_ours_is_deferred_at_its_limit_held_far_over_it_and_released(
    stack: Stack, small_limits: Gateway
) -> None:
    gateway = small_limits
    sender = f"burst-{uuid.uuid4().hex[:8]}@secumail.test"
    subject = f"sender:{sender}"

    def send() -> tuple[int, bytes]:
        return attempt(stack, "127.0.0.31", sender, "ops@elsewhere.test",
                       mail.plain(sender=sender, to="ops@elsewhere.test"))

    answers = [send() for _ in range(7)]
    assert [code for code, _ in answers] == [250, 250, 250, 450, 450, 450, 450], answers
    assert b"Outbound limit reached: 3 messages per hour for " + subject.encode() in \
        answers[3][1]
    # Two times the limit tried (factor 2): the seventh try holds the sender.
    assert b"Outbound mail held for " + subject.encode() in answers[6][1], answers[6]
    status, held = gateway.request("GET", "/admin/outbound/held")
    assert status == 200 and [h["subject"] for h in held] == [subject], held

    def told() -> bool:
        return any(m["Subject"] == f"SecuMail held outbound mail of {subject}"
                   for m in stack.mailbox("alice"))

    gateway.wait_for(told, "the admin was not told of the hold", timeout=90)
    status, _ = gateway.request("DELETE", f"/admin/outbound/held/{subject}")
    assert status == 204
    code, reply = send()  # released: back to its limit (still full this hour), not held
    assert code == 450 and b"Outbound limit reached" in reply, reply
    assert gateway.request("GET", "/admin/outbound/held") == (200, [])
    # Mail from outside is never counted against our limits.
    code, reply = attempt(stack, "203.0.113.9", "news@remote.test", "bob@secumail.test")
    assert b"Outbound" not in reply, reply
