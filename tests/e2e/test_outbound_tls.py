"""MTA-STS and DANE for mail leaving the stack (issue 34). Postfix, as rendered, asks the
resolver beside it (postfix-mta-sts-resolver) for each destination's MTA-STS policy, fetched
over HTTPS from the tests' policy host, and obeys the TLSA records of dane.test, a zone
signed by the tests and validated by the tests' unbound. The destinations are the tests'
own receivers (compose.test.yaml, names in tests/e2e/dns). A domain that demands TLS gets
its mail only over TLS with the certificate it asks for; anything else defers the mail,
never sends it in clear."""

from __future__ import annotations

import email
import json
import mailbox
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator

import parsedmarc
import pytest

from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_stack import attempt

# Domain -> the receiver its MX points at.
DELIVERED = {
    "sts-good.test": "remote-verified",  # enforce, a certificate from a CA Postfix trusts
    "sts-testing.test": "remote-plain",  # testing: reported, not enforced
    "no-sts.test": "remote-plain",  # no policy: opportunistic TLS, as before
    "good.dane.test": "remote-verified",  # DANE: validated TLSA records its key matches
}
DEFERRED = {
    "sts-selfsigned.test": ("remote-selfsigned", "certificate"),  # enforce, self-signed
    "sts-wrongname.test": ("remote-verified", "certificate"),  # a valid one for another name
    "sts-stripped.test": ("remote-plain", "TLS is required"),  # enforce, no STARTTLS
    "wrongkey.dane.test": ("remote-verified", "certificate"),  # TLSA of another key
    "stripped.dane.test": ("remote-plain", "TLS is required"),  # TLSA, no STARTTLS
}


@pytest.fixture(scope="module")
def delivery_by_mx(stack: Stack) -> Iterator[None]:
    """The test stack relays to its sink; here Postfix delivers by MX, as a site does."""
    os.environ["SECUMAIL_E2E_RELAYHOST"] = ""
    try:
        stack.recreate(("postfix",))
        yield
    finally:
        os.environ.pop("SECUMAIL_E2E_RELAYHOST", None)
        stack.recreate(("postfix",))


def subjects(stack: Stack, receiver: str) -> set[str]:
    path = stack.directory / receiver / "mbox"
    if not path.exists():
        return set()
    return {str(m["Subject"]) for m in mailbox.Maildir(str(path), create=False)}


def deferred(stack: Stack, tag: str) -> dict[str, tuple[str, str]]:
    """Our deferred recipients' domains -> (queue id, the reason Postfix gives)."""
    result = stack.exec("postfix", "postqueue", "-j")
    assert result.returncode == 0, result.stderr
    found = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        if tag not in entry.get("sender", ""):
            continue
        for recipient in entry["recipients"]:
            if recipient.get("delay_reason"):
                domain = recipient["address"].rpartition("@")[2]
                found[domain] = (entry["queue_id"], recipient["delay_reason"])
    return found


def test_mail_goes_out_only_as_each_destinations_mta_sts_policy_demands(
    stack: Stack, delivery_by_mx: None
) -> None:
    tag = uuid.uuid4().hex[:8]
    sender = f"sts-{tag}@secumail.test"
    for domain in [*DELIVERED, *DEFERRED]:
        recipient = f"postmaster@{domain}"
        code, reply = attempt(stack, "127.0.0.31", sender, recipient,
                              mail.plain(f"{tag} {domain}", sender=sender, to=recipient))
        assert code == 250, (domain, reply)

    deadline = time.monotonic() + 90
    while True:
        missing = [d for d, r in DELIVERED.items() if f"{tag} {d}" not in subjects(stack, r)]
        held = deferred(stack, tag)
        if not missing and set(held) == set(DEFERRED):
            break
        assert time.monotonic() < deadline, (f"not delivered: {missing}; deferred: "
                                             f"{sorted(held)}", stack.logs("postfix")[-6000:])
        time.sleep(1)
    try:
        for domain, (_, expected) in DEFERRED.items():
            assert expected in held[domain][1], held
        # Never sent in clear, nor to a server whose certificate was not verified.
        for domain, (receiver, _) in DEFERRED.items():
            assert f"{tag} {domain}" not in subjects(stack, receiver)
        log = stack.logs("postfix")
        for mx in ("mx.sts-good.test", "mx.good.dane.test"):
            assert re.search(rf"Verified TLS connection established to {re.escape(mx)}", log), \
                log[-4000:]
    finally:
        for queue_id, _ in held.values():
            stack.exec("postfix", "postsuper", "-d", queue_id)


def send_and_wait(stack: Stack, tag: str, domain: str) -> tuple[str, str]:
    """One message to postmaster@domain: its queue id and reason once it is deferred."""
    sender = f"sts-{tag}@secumail.test"
    code, reply = attempt(stack, "127.0.0.31", sender, f"postmaster@{domain}",
                          mail.plain(f"{tag} {domain}", sender=sender,
                                     to=f"postmaster@{domain}"))
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while domain not in (held := deferred(stack, tag)):
        assert time.monotonic() < deadline, stack.logs("postfix")[-4000:]
        time.sleep(1)
    return held[domain]


def test_a_policy_outlives_a_restart_while_its_host_is_unreachable(
    stack: Stack, delivery_by_mx: None
) -> None:
    """RFC 8461 10.2: an attacker on the path blocks the policy host while Postfix restarts
    (an upgrade), then strips STARTTLS. A policy kept in memory only is gone: the mail went
    out in clear. Kept on its volume, it is still enforced."""
    first, again = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    queued = [send_and_wait(stack, first, "sts-stripped.test")[0]]  # the policy now known
    subprocess.run([*stack.compose, "stop", "sts-policies"], check=True, capture_output=True)
    try:
        subprocess.run([*stack.compose, "restart", "postfix"], check=True, capture_output=True)
        stack.wait_healthy(["postfix"])
        queue_id, reason = send_and_wait(stack, again, "sts-stripped.test")
        queued.append(queue_id)
        assert "TLS is required" in reason, reason
        assert f"{again} sts-stripped.test" not in subjects(stack, "remote-plain")
    finally:
        subprocess.run([*stack.compose, "start", "sts-policies"], check=True,
                       capture_output=True)
        for queue_id in queued:
            stack.exec("postfix", "postsuper", "-d", queue_id)


COUNTED_SCRIPT = """
from secumail.tlsrpt import SessionStore
store = SessionStore("/var/lib/secumail/dmarc/tlsrpt.sqlite")
print(" ".join(sorted({domain for _, domain in store.pending("9999-12-31")})))
"""
# The gateway's daily round, a day ahead: today's sessions are then yesterday's.
REPORT_SCRIPT = """
import asyncio, json, time
from dataclasses import asdict
from prometheus_client import Counter
from gateway.tls_reports import TlsReporter
from secumail.txt_lookup import async_txt_lookup
from secumail.dns import make_async_resolver
from secumail.settings import load_settings
settings = load_settings()
lookup = async_txt_lookup(make_async_resolver(settings.dns_servers, settings.dns_timeout))
reporter = TlsReporter(settings, lookup, Counter("reports", "", ["result"]),
                       clock=lambda: time.time() + 86400)
print(json.dumps(asdict(asyncio.run(reporter.run()))))
"""


def test_each_destination_that_asks_gets_a_tls_report_of_its_sessions(
    stack: Stack, delivery_by_mx: None
) -> None:
    """RFC 8460, from Postfix's log to the destination's mailbox: sts-good.test's verified
    session, sts-testing.test's delivery in clear (testing mode: reported, not enforced) and
    sts-stripped.test's deferrals, each reported to the rua its _smtp._tls record names
    (tests/e2e/dns/dnsmasq.conf), DKIM-signed, and read by parsedmarc."""
    # Our domain's key (test_dkim.py and test_gateway.py make the same, whichever runs
    # first): the reports are signed with it.
    stack.exec("dkim", "secumail-dkim", "keygen", "secumail.test", "--selector", "e2e")
    tag = uuid.uuid4().hex[:8]
    sender = f"tlsrpt-{tag}@secumail.test"
    for domain in ("sts-good.test", "sts-testing.test", "sts-stripped.test"):
        code, reply = attempt(stack, "127.0.0.31", sender, f"postmaster@{domain}",
                              mail.plain(f"{tag} {domain}", sender=sender,
                                         to=f"postmaster@{domain}"))
        assert code == 250, reply
    wanted = {"sts-good.test", "sts-testing.test", "sts-stripped.test"}
    deadline = time.monotonic() + 90
    while not wanted <= set((counted := stack.exec(
            "gateway", "/opt/secumail/bin/python", "-c", COUNTED_SCRIPT)).stdout.split()):
        assert time.monotonic() < deadline, (counted.stdout, counted.stderr,
                                             stack.logs("gateway")[-3000:])
        time.sleep(2)
    queued = [queue_id for queue_id, _ in deferred(stack, tag).values()]
    try:
        ran = stack.exec("gateway", "/opt/secumail/bin/python", "-c", REPORT_SCRIPT)
        assert ran.returncode == 0, ran.stderr
        done = json.loads(ran.stdout)
        assert done["failed"] == {} and done["skipped"] == {}, done
        assert {what.split()[1] for what in done["sent"]} >= wanted, done
        reports = {}
        deadline = time.monotonic() + 90
        while not wanted <= set(reports):
            assert time.monotonic() < deadline, (sorted(reports), stack.logs("postfix")[-4000:])
            time.sleep(1)
            for raw in tls_report_mails(stack):
                message = email.message_from_bytes(raw)
                assert "d=secumail.test" in str(message["DKIM-Signature"]), message
                report = parsedmarc.parse_report_email(raw, offline=True)
                assert report["report_type"] == "smtp_tls"
                (policy,) = report["report"]["policies"]
                reports[policy["policy_domain"]] = policy
    finally:
        for queue_id in queued:
            stack.exec("postfix", "postsuper", "-d", queue_id)
    good, testing, stripped = (reports[d] for d in
                               ("sts-good.test", "sts-testing.test", "sts-stripped.test"))
    assert good["policy_type"] == "sts" and good["successful_session_count"] >= 1
    assert good["failed_session_count"] == 0, good
    assert "mode: testing" in testing["policy_strings"]
    assert testing["failure_details"][0]["result_type"] == "starttls-not-supported"
    assert stripped["failure_details"][0]["result_type"] == "starttls-not-supported"
    assert stripped["failure_details"][0]["receiving_mx_hostname"] == "mx.sts-stripped.test"


def tls_report_mails(stack: Stack) -> list[bytes]:
    path = stack.directory / "remote-plain" / "mbox"
    if not path.exists():
        return []
    return [bytes(m) for m in mailbox.Maildir(str(path), create=False)
            if str(m["Subject"]).startswith("Report Domain:") and m["TLS-Report-Domain"]]
