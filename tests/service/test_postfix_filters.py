"""A real Postfix in front of the filters, as the tutorial chains them: content_filter to the
ClamAV filter (10025), on to the SpamAssassin filter (10026), back into Postfix's
re-injection smtpd (10027), then delivery to an SMTP sink."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit import mail
from testkit.dkim import dkim_env, keygen, record_from_output, start_dkim
from testkit.dnsserver import LoopbackDNS
from testkit.postfix import PostfixInstance, filtering_postfix
from testkit.processes import Daemon, free_port
from testkit.scanners import Clamd
from testkit.sink import SmtpSink
from tests.service.conftest import StartChain

StartPostfix = Callable[..., tuple[PostfixInstance, int]]


@pytest.fixture
def postfix_chain(chain: StartChain, sink: SmtpSink) -> Iterator[StartPostfix]:
    """Postfix -> clamav filter -> spamd filter -> Postfix's 10027 -> the sink, in either
    mode (the tutorial's after-queue by default here)."""
    instances: list[PostfixInstance] = []

    def start(mode: str = "after-queue", milter: str = "", **filter_settings: str
              ) -> tuple[PostfixInstance, int]:
        reinjection = free_port()
        filters = chain(spamd_next_hop=f"127.0.0.1:{reinjection}", filter_mode=mode,
                        **filter_settings)
        postfix = filtering_postfix(mode, filters.port, reinjection, sink.port, milter).start()
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
    log = postfix.wait_for_log("status=bounced")
    assert "554 5.7.0 Message refused: virus found (Eicar-Test-Signature" in log
    [bounce] = sink.wait_for(1)  # the DSN went back to the sender
    assert "MAILER-DAEMON@mx.secumail.test" in bounce["From"]
    assert "virus found" in bounce.as_string()
    assert postfix.queue_ids() == []


def test_spam_is_refused_and_bounced(postfix_chain: StartPostfix, sink: SmtpSink) -> None:
    postfix, _ = postfix_chain()
    submit(postfix.port, mail.gtube(), ret="HDRS")
    log = postfix.wait_for_log("status=bounced")
    assert "554 5.7.1 Message refused as spam" in log
    assert postfix.queue_ids() == []


def test_clamd_down_defers_then_delivers_when_back(
    postfix_chain: StartPostfix, sink: SmtpSink
) -> None:
    clamd = Clamd()
    postfix, _ = postfix_chain(clamd_address=clamd.address)
    submit(postfix.port, mail.plain(subject="held back"))
    log = postfix.wait_for_log("status=deferred")
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


# --- before-queue: refused in the client's own session (issue 15) ---------------------------


def refused(port: int, message: bytes, remote: str = "203.0.113.7") -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPDataError) as error:
        submit(port, message, remote=remote)
    return error.value.smtp_code, error.value.smtp_error


def test_before_queue_clean_mail_is_queued_once_with_both_headers(
    postfix_chain: StartPostfix, sink: SmtpSink
) -> None:
    postfix, _ = postfix_chain("before-queue")
    submit(postfix.port, mail.plain(subject="once"), remote="203.0.113.7")
    [message] = sink.wait_for(1)
    assert message["X-AV-Checked"].startswith("ClamAV using SecuMail")
    assert message["X-Spam-Flag"] == "NO"
    assert "X-SecuMail-Client" in message  # no milter here to remove it: see below
    log = postfix.wait_for_log("status=sent")
    # The proxying smtpd queues nothing (NOQUEUE); 10027 queues the message once.
    assert "NOQUEUE: client=mail.remote.test[203.0.113.7]" in log
    assert "proxy-accept: END-OF-MESSAGE: 250 2.0.0 Ok: queued as " in log
    assert log.count(": client=") == 2 and log.count("status=sent") == 1


@pytest.mark.parametrize(("message", "answer"), [
    (mail.eicar(), b"5.7.0 Message refused: virus found (Eicar-Test-Signature"),
    (mail.gtube(), b"5.7.1 Message refused as spam (score"),
], ids=["eicar", "gtube"])
def test_before_queue_a_virus_or_spam_is_the_clients_5xx(
    postfix_chain: StartPostfix, sink: SmtpSink, message: bytes, answer: bytes
) -> None:
    postfix, _ = postfix_chain("before-queue", virus_action="reject")
    code, text = refused(postfix.port, message)
    assert code == 554 and answer in text
    time.sleep(1)
    assert sink.handler.messages == [] and postfix.queue_ids() == []
    assert "bounced" not in postfix.log()  # nobody gets a bounce: the client was told


def test_before_queue_no_scanner_means_a_4xx_not_unscanned_mail(
    postfix_chain: StartPostfix, sink: SmtpSink
) -> None:
    postfix, _ = postfix_chain("before-queue", clamd_address=Clamd().address)
    code, text = refused(postfix.port, mail.plain(subject="held back"))
    assert code == 451 and b"Virus scanner unavailable" in text
    assert sink.handler.messages == [] and postfix.queue_ids() == []


def test_before_queue_no_filter_at_all_means_a_4xx(sink: SmtpSink) -> None:
    postfix = filtering_postfix("before-queue", free_port(), free_port(), sink.port).start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=60) as smtp:
            smtp.ehlo("client.secumail.test")
            smtp.mail("alice@secumail.test")
            smtp.rcpt("bob@secumail.test")
            code, _ = smtp.data(mail.plain())
        assert 400 <= code < 500
        # Only Postfix's notice to the postmaster that its proxy was down is queued.
        assert sink.handler.messages == []
        assert all('"sender": "double-bounce@' in entry for entry in postfix.queue_ids())
    finally:
        postfix.stop()


# --- after-queue: no backscatter --------------------------------------------------------------


def test_after_queue_spam_from_a_stranger_is_kept_not_bounced(
    postfix_chain: StartPostfix, sink: SmtpSink
) -> None:
    """A GTUBE with a forged sender: after queueing, refusing it would bounce the spam to
    the victim (backscatter). It is quarantined instead, with a log line and a metric."""
    postfix, _ = postfix_chain()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=60) as smtp:
        smtp.ehlo("client.secumail.test")
        assert smtp.docmd("XCLIENT", "ADDR=203.0.113.7 NAME=mail.remote.test")[0] == 220
        smtp.ehlo("mail.remote.test")
        smtp.sendmail("victim@secumail.test", ["bob@secumail.test"], mail.gtube())
    log = postfix.wait_for_log("status=sent")
    assert "quarantined as" in log and "bounced" not in log
    time.sleep(1)
    assert sink.handler.messages == []  # nothing went to the victim (nor to bob)


# --- before-queue: the DKIM milter behind the filters -----------------------------------------


@pytest.fixture
def milter_behind_filters(tmp_path: Path, dns_server: LoopbackDNS) -> Iterator[Daemon]:
    """The real milter as the 10027 smtpd asks it in before-queue mode: its SMTP client is a
    filter (loopback here), the real client in the filters' X-SecuMail-Client header."""
    keys_dir = tmp_path / "keys"
    name, value = record_from_output(keygen(keys_dir, "keygen", "secumail.test",
                                            "--selector", "s1"))
    dns_server.add(name, "TXT", " ".join(f'"{value[i:i + 255]}"'
                                         for i in range(0, len(value), 255)))
    port = free_port()
    daemon = start_dkim(dkim_env(port, keys_dir, dns_server.spec, filter_mode="before-queue",
                                 filter_subnet="127.0.0.0/8", mynetworks="127.0.0.1/32"))
    yield daemon
    daemon.stop()


def test_before_queue_the_milter_knows_the_real_client(
    postfix_chain: StartPostfix, sink: SmtpSink, milter_behind_filters: Daemon
) -> None:
    milter = milter_behind_filters.env["SECUMAIL_DKIM_LISTEN"]
    postfix, _ = postfix_chain("before-queue", milter=milter)
    # From the internet: verified, with this host's SPF check of the real client.
    submit(postfix.port, mail.plain(subject="inbound"), remote="203.0.113.7")
    # From a trusted host: signed, though the milter's own client is a filter.
    submit(postfix.port, mail.plain(subject="outbound"))
    # From the internet, claiming to be trusted: verified, its claim removed.
    forged = b"X-SecuMail-Client: addr=127.0.0.1; helo=x; proto=ESMTPA\r\n" + mail.plain(
        subject="forged")
    submit(postfix.port, forged, remote="203.0.113.8")
    messages = {m["Subject"]: m for m in sink.wait_for(3)}
    assert all("X-SecuMail-Client" not in m for m in messages.values())
    assert "spf=none smtp.mailfrom=secumail.test" in messages["inbound"]["Authentication-Results"]
    assert "DKIM-Signature" not in messages["inbound"]
    assert "d=secumail.test" in messages["outbound"]["DKIM-Signature"]
    assert "DKIM-Signature" not in messages["forged"]
    assert "Authentication-Results" in messages["forged"]
    assert milter_behind_filters.logged("origin=203.0.113.7")
    assert milter_behind_filters.logged("origin=203.0.113.8")
