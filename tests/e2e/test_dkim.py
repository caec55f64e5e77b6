"""The DKIM milter in the stack: outbound mail leaves signed, inbound mail gets one
Authentication-Results header with the SPF result the policy service found."""

from __future__ import annotations

import re
import time
import uuid

import dkim

from tests.e2e.conftest import Stack
from tests.e2e.test_stack import attempt, deliver
from tests.support import mail


def test_outbound_mail_is_signed_with_a_key_made_by_the_key_tool(stack: Stack) -> None:
    made = stack.exec("dkim", "secumail-dkim", "keygen", "secumail.test", "--selector", "e2e")
    assert made.returncode == 0, made.stderr
    record = re.search(r"value: (v=DKIM1;.*)", made.stdout)
    assert record, made.stdout
    time.sleep(2)  # the milter notices new keys within a second
    subject = "signed " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="bob@secumail.test", to="carol@elsewhere.test")
    code, reply = attempt(stack, "127.0.0.40", "bob@secumail.test", "carol@elsewhere.test", message)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.sink() if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("dkim")[-3000:]
        time.sleep(1)
    signed = found[0].as_bytes()
    assert b"d=secumail.test" in signed and b"s=e2e" in signed
    published = record.group(1).encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return published if name == b"e2e._domainkey.secumail.test." else b""

    assert dkim.verify(signed, dnsfunc=dns)


def test_inbound_mail_gets_authentication_results(stack: Stack) -> None:
    sender = f"erin.{uuid.uuid4().hex[:8]}@remote.test"
    subject = "inbound " + sender
    forged = b"Authentication-Results: mx.secumail.test; dkim=pass\r\n"
    message = forged + mail.plain(subject=subject, sender=sender)
    assert deliver(stack, "203.0.113.50", sender, "bob@secumail.test", message)[0] == 250
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("dkim")[-3000:]
        time.sleep(1)
    [results] = found[0].get_all("Authentication-Results")  # the forged one is gone
    assert results.startswith("mx.secumail.test;")
    assert "spf=pass" in results and "dkim=none" in results
