"""The two filter modes on the running stack (issue 15): before-queue (the default), where a
refusal is the client's own 5xx and a scanner down is its 4xx; after-queue (the tutorial's),
where nothing refused after queueing ever bounces to a sender nobody vouches for."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_stack import attempt, deliver


def test_before_queue_clamd_down_is_a_4xx_then_the_message_goes_through(stack: Stack) -> None:
    assert stack.mode == "before-queue"
    subject = "held back " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="alice@secumail.test")
    subprocess.run([*stack.compose, "stop", "clamd"], check=True, capture_output=True)
    try:
        code, reply = attempt(stack, "127.0.0.12", "alice@secumail.test", "bob@secumail.test",
                              message)
        assert 400 <= code < 500 and b"Virus scanner unavailable" in reply, reply
    finally:
        subprocess.run([*stack.compose, "start", "clamd"], check=True, capture_output=True)
        stack.wait_healthy(["clamd", "clamav"])
    assert not [m for m in stack.mailbox("bob") if m["Subject"] == subject]  # never unscanned
    code, reply = attempt(stack, "127.0.0.12", "alice@secumail.test", "bob@secumail.test",
                          message)  # the client retries, as an MTA does
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    [delivered] = found
    assert delivered["X-AV-Checked"] and delivered["X-Spam-Status"]


@pytest.fixture(scope="module")
def after_queue(stack: Stack) -> Iterator[Stack]:
    stack.switch_mode("after-queue")
    yield stack
    stack.switch_mode("before-queue")


def test_after_queue_spam_from_a_forged_sender_bounces_to_nobody(after_queue: Stack) -> None:
    """A GTUBE with MAIL FROM:<victim@remote.test> from the internet: after queueing, a
    refusal would send the victim a bounce carrying the spam. It is quarantined instead."""
    stack = after_queue
    victim = f"victim.{uuid.uuid4().hex[:8]}@remote.test"
    message = mail.gtube()
    code, reply = deliver(stack, "203.0.113.30", victim, "bob@secumail.test", message)
    assert code == 250, reply  # after-queue: Postfix takes it before the filters see it
    deadline = time.monotonic() + 60
    while not (lines := [line for line in stack.logs("spamd").splitlines()
                         if f"sender={victim}" in line]):
        assert time.monotonic() < deadline, stack.logs("spamd")[-3000:]
        time.sleep(1)
    assert "action=quarantine" in lines[-1] and "a sender nobody vouches for" in lines[-1]
    time.sleep(5)  # a bounce would be on its way by now
    assert not [m for m in stack.sink() if victim in m.as_string()], "backscatter"


def test_after_queue_a_trusted_senders_virus_bounces_to_it(after_queue: Stack) -> None:
    """Mail from mynetworks: its own users deserve to know, the bounce is no backscatter."""
    stack = after_queue
    before = len(stack.mailbox("alice"))
    code, reply = attempt(stack, "127.0.0.13", "alice@secumail.test", "bob@secumail.test",
                          mail.eicar())
    assert code == 250, reply
    [*_, bounce] = stack.wait_for_mail("alice", before + 1)
    assert "MAILER-DAEMON" in bounce["From"] and "virus found" in bounce.as_string()
