"""The stack as users run it (compose.yaml + the test overlay), driven by real SMTP sessions
on the published port 25. XCLIENT (allowed for the test client only) lets one client
appear as several remote hosts."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time
import uuid
from email.utils import make_msgid

import pytest

from testkit import mail
from tests.e2e.conftest import CLAMAV_REPLICAS, Stack

# A HELO name the test DNS does not know: with no reverse DNS (the sessions' default), a
# client that selective greylisting scores at its threshold, as a spam bot.
BOT_HELO = "x7gq2k.remote.test"


def session(
    stack: Stack, client: str, helo: str = "mail.remote.test", name: str = "[UNAVAILABLE]"
) -> smtplib.SMTP:
    """A session from `client`, whose reverse DNS name is `name` (forward-confirmed)."""
    smtp = smtplib.SMTP(stack.smtp_host, stack.smtp_port, timeout=60)
    smtp.ehlo("test-client.secumail.test")
    code, reply = smtp.docmd("XCLIENT", f"ADDR={client} NAME={name} REVERSE_NAME={name}")
    assert code == 220, reply
    smtp.ehlo(helo)
    return smtp


def attempt(
    stack: Stack,
    client: str,
    sender: str,
    recipient: str,
    message: bytes = b"",
    helo: str = "mail.remote.test",
    name: str = "[UNAVAILABLE]",
) -> tuple[int, bytes]:
    """One transaction; the first refusal (MAIL, RCPT or DATA), or the DATA answer."""
    with session(stack, client, helo, name) as smtp:
        code, reply = smtp.mail(sender, ["RET=HDRS"])
        if code != 250:
            return code, reply
        code, reply = smtp.rcpt(recipient)
        if code != 250:
            return code, reply
        return smtp.data(message or mail.plain(sender=sender, to=recipient))


def deliver(
    stack: Stack, client: str, sender: str, recipient: str, message: bytes = b"", **how: str
) -> tuple[int, bytes]:
    """`attempt`, retried once after the greylisting delay if greylisted, as an MTA would."""
    code, reply = attempt(stack, client, sender, recipient, message, **how)
    if code == 450 and b"Greylisted" in reply:
        time.sleep(3)
        code, reply = attempt(stack, client, sender, recipient, message, **how)
    return code, reply


def test_remote_mail_is_greylisted_then_delivered_with_every_header(stack: Stack) -> None:
    sender = f"alice.{uuid.uuid4().hex[:8]}@remote.test"  # a triplet never seen before
    subject = f"through the chain {sender}"
    message = mail.plain(subject=subject, sender=sender)
    code, reply = attempt(stack, "203.0.113.7", sender, "bob@secumail.test", message,
                          helo=BOT_HELO)
    assert code == 450 and b"Greylisted" in reply, reply
    time.sleep(3)
    code, reply = attempt(stack, "203.0.113.7", sender, "bob@secumail.test", message,
                          helo=BOT_HELO)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    [delivered] = found
    assert delivered["Received-SPF"].startswith("pass ")
    assert delivered["X-Greylist"].startswith("delayed ")
    assert "score 2 (no-rdns +2, helo-unresolved +1, spf-pass -1)" in delivered["X-Greylist"]
    assert delivered["X-AV-Checked"] == "ClamAV using SecuMail at mx.secumail.test"
    assert delivered["X-Spam-Flag"] == "NO" and delivered["X-Spam-Status"].startswith("No,")


def test_a_provider_with_forward_confirmed_rdns_and_spf_is_not_delayed(stack: Stack) -> None:
    """Selective greylisting (the default): no delay for a client that looks like a mail
    server; the header and the policy log say why."""
    sender = f"otp.{uuid.uuid4().hex[:8]}@remote.test"  # a triplet never seen before
    subject = f"login code {sender}"
    message = mail.plain(subject=subject, sender=sender)
    code, reply = attempt(stack, "203.0.113.7", sender, "bob@secumail.test", message,
                          name="mail.remote.test")
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    # -1 for SPF pass, and -1 more once other tests got the /24 through greylisting.
    greylist = found[0]["X-Greylist"]
    assert greylist.startswith("not delayed by SecuMail at mx.secumail.test, score -"), greylist
    assert "spf-pass -1" in greylist and "no-rdns" not in greylist, greylist
    assert f"sender={sender}" in stack.logs("policy")


def test_spf_fail_is_550(stack: Stack) -> None:
    code, reply = attempt(stack, "203.0.113.8", "ceo@bank.test", "bob@secumail.test")
    assert code == 550 and reply.startswith(b"5.7.23") and b"SPF check failed" in reply, reply


def test_dnsbl_listed_client_is_554(stack: Stack) -> None:
    code, reply = attempt(stack, "203.0.113.66", "alice@remote.test", "bob@secumail.test")
    assert code == 554 and b"blocked using rbl.test" in reply, reply


@pytest.mark.parametrize(
    ("helo", "sender", "expected"),
    [
        ("mailserver", "alice@remote.test", b"need fully-qualified hostname"),
        ("bad_name!.remote.test", "alice@remote.test", b"Helo command rejected"),
        ("mail.remote.test", "alice", b"need fully-qualified address"),
        ("mail.remote.test", "alice@nowhere.test", b"Domain not found"),
    ],
)
def test_the_tutorials_helo_and_sender_restrictions(
    stack: Stack, helo: str, sender: str, expected: bytes
) -> None:
    code, reply = attempt(stack, "198.51.100.7", sender, "bob@secumail.test", helo=helo)
    assert 500 <= code < 600 and expected in reply, (code, reply)


def test_postfix_resolves_through_secumail_dns_servers(stack: Stack) -> None:
    """Issue 32: SECUMAIL_DNS_SERVERS reached the Python services but not Postfix, and a lab
    host refused the first message (550 5.1.8 Domain not found). The overlay gives Postfix
    no `dns:` of Docker's any more: the .test zones come through its forwarder, from the
    servers the setting names, and the service names still from Docker's DNS."""
    (container,) = stack.containers("postfix")

    def run(*command: str) -> str:
        return subprocess.run(["docker", "exec", container, *command], capture_output=True,
                              text=True, timeout=30).stdout

    assert run("cat", "/etc/resolv.conf").splitlines()[0] == "nameserver 127.0.0.1"
    assert run("getent", "ahostsv4", "mail.remote.test").split()[:1] == ["203.0.113.7"]
    service = run("getent", "ahostsv4", "policy").split()[:1]
    assert service and service[0].startswith("172.29."), service
    assert run("getent", "ahostsv4", "nowhere.test") == ""


def test_no_relaying_for_outsiders(stack: Stack) -> None:
    code, reply = attempt(stack, "203.0.113.9", "alice@remote.test", "carol@elsewhere.test")
    assert code == 554 and b"Relay access denied" in reply, reply


def test_mynetworks_may_relay_through_the_filters(stack: Stack) -> None:
    subject = "relayed " + make_msgid()
    message = mail.plain(subject=subject, sender="bob@secumail.test", to="carol@elsewhere.test")
    code, reply = attempt(stack, "127.0.0.9", "bob@secumail.test", "carol@elsewhere.test", message)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not [m for m in stack.sink() if m["Subject"] == subject]:
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    [relayed] = [m for m in stack.sink() if m["Subject"] == subject]
    assert relayed["X-AV-Checked"] and relayed["X-Spam-Flag"] == "NO"


@pytest.mark.parametrize("payload", ["eicar", "clam.zip"])
def test_viruses_are_refused_in_the_session(stack: Stack, payload: str) -> None:
    """Before-queue (the default): the client is told, in its own session; nobody gets a
    bounce. (After-queue: tests/e2e/test_modes.py.)"""
    message = mail.eicar() if payload == "eicar" else mail.with_attachment(payload)
    code, reply = attempt(stack, "127.0.0.10", "alice@secumail.test", "bob@secumail.test", message)
    assert code == 554 and b"virus found" in reply, reply


def test_gtube_is_refused_as_spam_in_the_session(stack: Stack) -> None:
    code, reply = attempt(stack, "127.0.0.11", "alice@secumail.test", "bob@secumail.test",
                          mail.gtube())
    assert code == 554 and b"Message refused as spam (score" in reply, reply


def test_only_port_25_is_published(stack: Stack) -> None:
    for port in (10023, 10025, 10026, 10027, 10028, 3310, 783, 6379, 9100, 9090):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    published = subprocess.run(
        [
            "docker",
            "ps",
            "--filter",
            "label=com.docker.compose.project=secumail-e2e",
            "--format",
            "{{.Ports}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "->25/tcp" in published
    assert "10027/tcp" not in published.replace("10027/tcp,", "").split("->")[-1] or (
        "->10027" not in published
    )


def test_scaled_filters_share_a_burst_and_nothing_is_doubled(stack: Stack) -> None:
    replicas = stack.containers("clamav")
    assert len(replicas) == CLAMAV_REPLICAS
    sender = f"burst.{uuid.uuid4().hex[:8]}@secumail.test"  # names this burst in the logs
    count = 30
    with session(stack, "127.0.0.12") as smtp:
        for n in range(count):
            message = mail.plain(subject=f"{sender} {n}", sender=sender, to="dave@secumail.test")
            smtp.sendmail(sender, ["dave@secumail.test"], message)
    deadline = time.monotonic() + 120
    while len([m for m in stack.mailbox("dave") if sender in m["Subject"]]) < count:
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    time.sleep(3)  # anything doubled would arrive right behind
    subjects = [m["Subject"] for m in stack.mailbox("dave") if sender in m["Subject"]]
    assert sorted(subjects) == sorted(f"{sender} {n}" for n in range(count))
    handled = []
    for replica in replicas:
        logs = subprocess.run(["docker", "logs", replica], capture_output=True, text=True)
        handled.append((logs.stdout + logs.stderr).count(f"sender={sender}"))
    assert sum(handled) == count and all(n > 0 for n in handled), handled
