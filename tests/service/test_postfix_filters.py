"""A real Postfix in front of the filters, as the tutorial chains them: content_filter to the
ClamAV filter (10025), on to the SpamAssassin filter (10026), back into Postfix's
re-injection smtpd (10027), then delivery to an SMTP sink."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator

import pytest

from tests.service.conftest import StartChain
from tests.support import mail
from tests.support.postfix import PostfixInstance, sink_transport
from tests.support.processes import free_port
from tests.support.scanners import Clamd
from tests.support.sink import SmtpSink

StartPostfix = Callable[..., tuple[PostfixInstance, int]]


def reinjection_service(port: int) -> str:
    """The tutorial's master.cf entry for mail coming back from the filters."""
    options = [
        "content_filter=",
        "receive_override_options=no_unknown_recipient_checks,no_header_body_checks",
        "smtpd_helo_restrictions=", "smtpd_client_restrictions=",
        "smtpd_sender_restrictions=", "smtpd_recipient_restrictions=permit_mynetworks,reject",
        "mynetworks_style=host", "smtpd_authorized_xforward_hosts=127.0.0.0/8",
    ]
    return f"127.0.0.1:{port} inet n - n - 16 smtpd\n" + "".join(f"  -o {o}\n" for o in options)


@pytest.fixture
def postfix_chain(chain: StartChain, sink: SmtpSink) -> Iterator[StartPostfix]:
    instances: list[PostfixInstance] = []

    def start(**filter_settings: str) -> tuple[PostfixInstance, int]:
        reinjection = free_port()
        filters = chain(spamd_next_hop=f"127.0.0.1:{reinjection}", **filter_settings)
        postfix = PostfixInstance(
            {
                **sink_transport(sink.port),
                "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
                "content_filter": f"scan:[127.0.0.1]:{filters.port}",
                "receive_override_options": "no_address_mappings",
            },
            extra_master=(
                "scan unix - - n - 16 smtp\n  -o smtp_send_xforward_command=yes\n"
                + reinjection_service(reinjection)
            ),
        ).start()
        instances.append(postfix)
        return postfix, filters.port

    yield start
    for postfix in instances:
        postfix.stop()


def submit(port: int, message: bytes, remote: str | None = None, **options: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("client.secumail.test")
        if remote:
            assert smtp.docmd("XCLIENT", f"ADDR={remote} NAME=mail.remote.test")[0] == 220
            smtp.ehlo("mail.remote.test")
        mail_options = [f"{k.upper()}={v}" for k, v in options.items()]
        smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], message, mail_options)


def wait_for_log(postfix: PostfixInstance, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in postfix.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the Postfix log:\n{postfix.log()[-3000:]}")
        time.sleep(0.2)
    return postfix.log()


def test_clean_mail_through_the_whole_chain(postfix_chain: StartPostfix, sink: SmtpSink) -> None:
    postfix, _ = postfix_chain()
    submit(postfix.port, mail.plain(), remote="203.0.113.7")
    [message] = sink.wait_for(1)
    assert message["X-AV-Checked"] == "ClamAV using SecuMail at mx.secumail.test"
    assert message["X-Spam-Flag"] == "NO"
    # XFORWARD carried the real client through both filters into the re-injected mail.
    received = message.get_all("Received")
    assert any("mail.remote.test [203.0.113.7]" in r for r in received), received


def test_virus_is_refused_and_bounced_not_lost(postfix_chain: StartPostfix, sink: SmtpSink) -> None:
    postfix, _ = postfix_chain(virus_action="reject")
    submit(postfix.port, mail.eicar(), ret="HDRS")
    log = wait_for_log(postfix, "status=bounced")
    assert "554 5.7.0 Message refused: virus found (Eicar-Test-Signature" in log
    [bounce] = sink.wait_for(1)  # the DSN went back to the sender
    assert "MAILER-DAEMON@mx.secumail.test" in bounce["From"]
    assert "virus found" in bounce.as_string()
    assert postfix.queue_ids() == []


def test_spam_is_refused_and_bounced(postfix_chain: StartPostfix, sink: SmtpSink) -> None:
    postfix, _ = postfix_chain()
    submit(postfix.port, mail.gtube(), ret="HDRS")
    log = wait_for_log(postfix, "status=bounced")
    assert "554 5.7.1 Message refused as spam" in log
    assert postfix.queue_ids() == []


def test_clamd_down_defers_then_delivers_when_back(
    postfix_chain: StartPostfix, sink: SmtpSink
) -> None:
    clamd = Clamd()
    postfix, _ = postfix_chain(clamd_address=clamd.address)
    submit(postfix.port, mail.plain(subject="held back"))
    log = wait_for_log(postfix, "status=deferred")
    assert "451 4.7.1 Virus scanner unavailable" in log
    assert len(postfix.queue_ids()) == 1
    assert sink.handler.messages == []
    clamd.start()
    try:
        assert postfix.postfix("flush").returncode == 0
        [message] = sink.wait_for(1)
    finally:
        clamd.stop()
    assert message["Subject"] == "held back"
    assert message["X-AV-Checked"].startswith("ClamAV using SecuMail")
