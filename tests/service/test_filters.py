"""The ClamAV and SpamAssassin filters as real processes, with real clamd and spamd, in a
chain clamav filter -> spamd filter -> SMTP sink, driven by real SMTP sessions."""

from __future__ import annotations

import smtplib
import socket
import time
from email import message_from_bytes
from typing import Any

import pytest

from secumail.access import AllowedClients
from testkit import mail
from testkit.processes import free_port, scrape
from testkit.sink import SmtpSink
from tests.service.conftest import Chain, StartChain


def test_clean_mail_passes_both_filters_with_their_headers(
    chain: StartChain, sink: SmtpSink
) -> None:
    forged = b"X-Spam-Flag: NO\r\nX-Virus-Infected: nothing to see\r\n" + mail.plain()
    filters = chain()
    assert filters.send(forged) == {}
    [message] = sink.wait_for(1)
    assert message["X-AV-Checked"] == "ClamAV using SecuMail at mx.secumail.test"
    assert message["X-Spam-Flag"] == "NO"
    assert message["X-Spam-Status"].startswith("No, score=")
    assert float(message["X-Spam-Score"]) < 5
    assert message.get_all("X-Spam-Flag") == ["NO"]  # the sender's own copy was removed
    assert message["X-Virus-Infected"] is None
    assert 'secumail_filter_messages_total{filter="clamav",verdict="clean"} 1.0' in scrape(
        filters.clamav.metrics_port
    )
    assert filters.clamav.logged("verdict=clean")


@pytest.mark.parametrize(
    "attachment", ["clam.zip", "clam.7z", "clam.pdf", "clam.ole.doc", "clam.exe"]
)
def test_viruses_in_attachments_are_rejected(
    chain: StartChain, sink: SmtpSink, attachment: str
) -> None:
    filters = chain(virus_action="reject")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        filters.send(mail.with_attachment(attachment))
    assert refused.value.smtp_code == 554
    assert b"virus found (ClamAV-Test-File" in refused.value.smtp_error
    assert sink.handler.messages == []


def test_a_file_name_in_the_idna_charset_is_read_not_answered_451(
    chain: StartChain, sink: SmtpSink
) -> None:
    """`=?idna?...?=` made the name's decoding raise (Python's idna codec cannot replace
    what it cannot read): the ClamAV filter answered 451 to the message for ever."""
    filters = chain()
    message = mail.with_part(
        'Content-Type: text/plain; name="=?idna?B?eG4tLS0tLS0tLS0tLS0tLS0t?=.txt"\n'
        "Content-Transfer-Encoding: 7bit", b"just a note\n")
    assert data_reply(filters.port, message)[0] == 250
    [delivered] = sink.wait_for(1)
    assert "just a note" in delivered.as_string()


def test_eicar_drop_quarantine_and_pass(chain: StartChain, sink: SmtpSink) -> None:
    dropped = chain(virus_action="drop")
    code, reply = data_reply(dropped.port, mail.eicar())
    assert code == 250 and b"discarded (virus Eicar-Test-Signature" in reply
    kept = chain(virus_action="quarantine")
    code, reply = data_reply(kept.port, mail.eicar())
    assert code == 250 and b"quarantined as " in reply, reply
    [record] = list((kept.quarantine / "clamav").glob("*.json"))
    assert '"verdict": "virus"' in record.read_text()
    assert record.with_suffix(".eml").read_bytes().count(b"EICAR-STANDARD-ANTIVIRUS") == 1
    assert sink.handler.messages == []
    passed = chain(virus_action="pass")
    passed.send(mail.eicar())
    [message] = sink.wait_for(1)
    assert message["X-Virus-Infected"].startswith("Eicar-Test-Signature")


def test_a_full_quarantine_is_a_452_before_queue_and_a_counted_drop_after(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Issue 30: each quarantined message filled the volume without bound."""
    kept = chain(virus_action="quarantine", quarantine_max_messages="2")
    for _ in range(2):
        assert b"quarantined as " in data_reply(kept.port, mail.eicar())[1]
    code, reply = data_reply(kept.port, mail.eicar())
    assert (code, reply) == (452, b"4.3.1 Quarantine full, please try again later")
    assert kept.clamav.logged("quarantine full")
    after = chain(virus_action="quarantine", quarantine_max_messages="2",
                  filter_mode="after-queue")
    code, reply = data_reply(after.port, mail.eicar())
    assert code == 250 and reply.startswith(b"2.0.0 Ok: discarded, quarantine full"), reply
    assert ('secumail_filter_quarantine_full_total{filter="clamav"} 1.0'
            in scrape(after.clamav.metrics_port))
    assert len(list((kept.quarantine / "clamav").glob("*.eml"))) == 2
    assert sink.handler.messages == []


def data_reply(port: int, message: bytes) -> tuple[int, bytes]:
    """The answer to the end of DATA, whatever it is."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.mail("alice@secumail.test")[0] == 250
        assert smtp.rcpt("bob@secumail.test")[0] == 250
        return smtp.data(message)


def test_a_refused_message_is_never_delivered_and_the_session_goes_on(
    chain: StartChain, sink: SmtpSink
) -> None:
    """A refused message cancels the next hop's open transaction (nothing reaches the sink)
    and the same session's next messages still go through, each once."""
    filters = chain(virus_action="reject")
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        for attempt in range(3):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], mail.eicar())
            assert refused.value.smtp_code == 554, attempt
            assert smtp.rset()[0] == 250
            clean = mail.plain(f"clean {attempt}")
            smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], clean)
    delivered = sink.wait_for(3)
    assert sorted(message["Subject"] for message in delivered) == ["clean 0", "clean 1", "clean 2"]
    assert all("X-AV-Checked" in message for message in delivered)


def test_gtube_rejected_or_tagged(chain: StartChain, sink: SmtpSink) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        chain().send(mail.gtube())
    assert refused.value.smtp_code == 554 and b"as spam (score" in refused.value.smtp_error
    chain(spam_quarantine_score="5000", spam_reject_score="5000").send(mail.gtube())
    [message] = sink.wait_for(1)
    assert message["X-Spam-Flag"] == "YES"
    assert "GTUBE" in message["X-Spam-Status"]


def test_next_hop_answers_per_recipient(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain()
    refused = filters.send(
        mail.plain(), ("bob@secumail.test", "refuse@secumail.test", "defer@secumail.test")
    )
    assert refused["refuse@secumail.test"][0] == 550
    assert b"no such user" in refused["refuse@secumail.test"][1]
    assert refused["defer@secumail.test"][0] == 450
    sink.wait_for(1)
    assert [e.rcpt_tos for e in sink.envelopes] == [["bob@secumail.test"]]


def test_bounces_keep_their_null_sender(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain()
    assert filters.send(mail.plain(subject="a bounce"), sender="") == {}
    [message] = sink.wait_for(1)
    assert message["Subject"] == "a bounce"
    assert [e.mail_from for e in sink.envelopes] == ["<>"]  # aiosmtpd's spelling of <>


def test_the_next_hop_connection_is_kept_for_the_next_session(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Postfix opens a session per message; the filter keeps its own next-hop connection
    from one to the next, and opens a new one when the next hop closed the kept one."""
    filters = chain()
    for _ in range(3):
        assert filters.send(mail.plain()) == {}
    sink.wait_for(3)
    assert len(set(sink.peers)) == 1
    sink.restart()  # closes every connection, the filter's kept one too
    assert filters.send(mail.plain()) == {}
    sink.wait_for(4)
    assert len(set(sink.peers)) == 2
    assert not filters.spamd.logged("next hop unavailable", timeout=0.5)


def test_unreachable_next_hop_is_451(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain(spamd_next_hop=f"127.0.0.1:{free_port()}")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        filters.send(mail.plain())
    assert refused.value.smtp_code == 451
    assert filters.spamd.logged("next hop unavailable")


@pytest.mark.parametrize("scanner", ["clamd_address", "spamassassin_address"])
def test_scanner_down_is_451_or_marked_when_failing_open(
    chain: StartChain, sink: SmtpSink, scanner: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        chain(**{scanner: dead}).send(mail.plain())
    assert refused.value.smtp_code == 451
    fail_open = {"clamd_address": "clamav_fail_open", "spamassassin_address": "spamd_fail_open"}
    chain(**{scanner: dead, fail_open[scanner]: "true"}).send(mail.plain())
    [message] = sink.wait_for(1)
    if scanner == "clamd_address":
        assert message["X-AV-Checked"].startswith("not scanned")
    else:
        assert message["X-Spam-Status"] == "unchecked (spam checker unavailable)"


def test_an_idle_client_is_let_go_after_the_idle_timeout(chain: StartChain) -> None:
    """SECUMAIL_FILTER_IDLE_TIMEOUT (was a literal 300 in the code): a client that says
    nothing more is let go (the connection closed, or a 421 first); a busy one is not."""
    filters = chain(filter_idle_timeout="1.5")
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=30) as busy, \
            smtplib.SMTP("127.0.0.1", filters.port, timeout=30) as idle:
        busy.ehlo()
        idle.ehlo()
        for _ in range(4):  # 2 s in all, each command within the timeout
            time.sleep(0.5)
            assert busy.noop()[0] == 250
        time.sleep(1.0)  # idle: 3 s since its last command
        try:
            code: int | None = idle.noop()[0]
        except smtplib.SMTPServerDisconnected:
            code = None
        assert code in (None, 421)
        assert busy.noop()[0] == 250


def test_oversized_mail_is_552(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain(message_size_limit="20000")
    big = mail.plain(body="x" * 70 + "\n") * 400
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.mail("alice@secumail.test")[0] == 250
        assert smtp.rcpt("bob@secumail.test")[0] == 250
        code, _ = smtp.data(big)
        assert code == 552
        # The session goes on: the next hop's transaction of the refused message was
        # cancelled too (it answered the next MAIL "503 nested MAIL" before).
        smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], mail.plain())
    assert len(sink.handler.messages) == 1


def test_xforward_reaches_the_next_filter(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain()
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        smtp.ehlo("postfix.secumail.test")
        assert "xforward" in smtp.esmtp_features
        code, _ = smtp.docmd("XFORWARD", "NAME=mail.remote.test ADDR=203.0.113.9 PROTO=ESMTP")
        assert code == 250
        assert smtp.docmd("XFORWARD", "SHOESIZE=42")[0] == 501
        smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], mail.plain())
    sink.wait_for(1)
    assert filters.spamd.logged("client=203.0.113.9")


def raw_session(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(60)
        answers = b""
        sock.sendall(payload)
        # No half-close: aiosmtpd drops a session at end of input. Read until it hangs up.
        while chunk := sock.recv(65536):
            answers += chunk
    return answers


def first_try_then_retry(filters: Chain, sink: SmtpSink, subject: str, recipient: str,
                         reads_the_reply: bool, wait: float, message_id: bool = True) -> bytes:
    """A client sends a message and vanishes `wait` s after its final dot, our reply unread
    (or read); then the same message comes again, as a client that never heard 250 resends
    it. The message, as sent."""
    identity = f"Message-ID: <{subject}@secumail.test>\r\n" if message_id else ""
    message = f"Subject: {subject}\r\n{identity}\r\nbody\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", filters.port), timeout=60)
    sock.sendall(b"EHLO mx.secumail.test\r\nMAIL FROM:<alice@secumail.test>\r\n"
                 b"RCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n")
    answers = b""
    while b"\r\n354 " not in answers:
        answers += sock.recv(4096)
    sock.sendall(message + b".\r\n")
    time.sleep(wait)
    if reads_the_reply:
        assert b"250 " in sock.recv(4096)
    sock.close()
    return message


def test_a_retry_after_a_lost_250_is_answered_and_not_delivered_again(
    chain: StartChain, sink: SmtpSink
) -> None:
    """RFC 1047's duplicate, two ways: a client killed with our 250 unread in its socket
    (it resets the connection), and one that left while the next hop's 250 was on its way
    (the sink answers a slow... recipient 3 s after storing the message; the filter still
    reads that answer). Either way the message was delivered and the client resends it: the
    retry is answered 250 and not delivered again (secumail/lostacks.py), by any replica of
    either filter. A client that read our 250 and left is no such case."""
    filters = chain()
    cases = [("unread-250", "bob@secumail.test", False, "client reset the connection"),
             ("gone-before-250", "slow@secumail.test", False,
              "client left while the next hop's 250 was on its way"),
             ("read-250", "bob@secumail.test", True, "")]
    for count, (subject, recipient, reads, logged) in enumerate(cases, 1):
        message = first_try_then_retry(filters, sink, subject, recipient, reads, 1.0)
        sink.wait_for(count)
        if logged:
            assert filters.clamav.logged(logged, timeout=10), filters.clamav.output()[-2000:]
            assert filters.clamav.logged(f"message_id={subject}@secumail.test")
            with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
                smtp.sendmail("alice@secumail.test", [recipient], message)
            assert filters.clamav.logged("verdict=duplicate")
        time.sleep(1)
        assert [m["Subject"] for m in sink.wait_for(count)].count(subject) == 1
    assert "message_id=read-250@secumail.test" not in filters.clamav.output()


def test_a_retry_while_the_first_copy_is_still_awaited_waits_for_its_answer(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Issue 30 (the fault run's duplicate): a client that leaves while the next hop's 250
    is on its way, and retries at once, before that 250 came. The retry was delivered beside
    the first copy; now it is answered 451 until the first copy's answer is known, then 250
    without a second delivery."""
    filters = chain()
    message = first_try_then_retry(filters, sink, "impatient", "slow@secumail.test",
                                   False, 0.2)  # the sink answers slow@ after 3 s
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as waiting:
            smtp.sendmail("alice@secumail.test", ["slow@secumail.test"], message)
    assert waiting.value.smtp_code == 451
    assert b"earlier copy of this message is still being delivered" in \
        waiting.value.smtp_error
    assert filters.clamav.logged("client left while the next hop's 250 was on its way",
                                 timeout=10)
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        smtp.sendmail("alice@secumail.test", ["slow@secumail.test"], message)
    time.sleep(1)
    assert [m["Subject"] for m in sink.wait_for(1)] == ["impatient"]


def test_a_message_without_message_id_is_never_discarded_as_a_duplicate(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Issue 30: two messages without Message-ID, same envelope and body, within a day (a
    daily report) were one: the second was discarded after a lost 250 of the first."""
    filters = chain()
    message = first_try_then_retry(filters, sink, "daily-report", "bob@secumail.test",
                                   False, 1.0, message_id=False)
    sink.wait_for(1)
    assert filters.clamav.logged("no Message-ID, its retry will be delivered again",
                                 timeout=10), filters.clamav.output()[-2000:]
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=60) as smtp:
        smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], message)
    assert [m["Subject"] for m in sink.wait_for(2)] == ["daily-report", "daily-report"]
    assert not filters.clamav.logged("verdict=duplicate")


@pytest.mark.parametrize("smuggled", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"])
def test_smuggled_end_of_data_never_makes_two_messages(
    chain: StartChain, sink: SmtpSink, smuggled: bytes
) -> None:
    filters = chain()
    payload = (
        b"EHLO attacker.test\r\nMAIL FROM:<alice@secumail.test>\r\nRCPT TO:<bob@secumail.test>\r\n"
        b"DATA\r\nSubject: one\r\n\r\nfirst"
        + smuggled
        + b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<bob@secumail.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
    )
    answers = raw_session(filters.port, payload)
    assert answers.count(b"\r\n250 ") + answers.startswith(b"250 ") >= 1
    messages = sink.wait_for(1)
    assert len(sink.handler.messages) == 1
    assert [e.mail_from for e in sink.envelopes] == ["alice@secumail.test"]
    assert messages[0]["Subject"] == "one"
    raw = sink.handler.messages[0][1]
    assert b"MAIL FROM:<ceo@bank.test>" in raw  # it stayed text inside the one message


def test_a_stray_cr_never_makes_a_header(chain: StartChain, sink: SmtpSink) -> None:
    """Issue 13, item 12: the filters used to turn a lone CR into a line break, which could
    make a header after the milter had checked the headers (a Postfix older than 3.7.10
    passes a lone CR as it is). It is a space now."""
    filters = chain()
    payload = (
        b"EHLO attacker.test\r\nMAIL FROM:<alice@secumail.test>\r\n"
        b"RCPT TO:<bob@secumail.test>\r\nDATA\r\nFrom: alice@secumail.test\r\n"
        b"Subject: invoice\rAuthentication-Results: mx.secumail.test; dmarc=pass\r\n"
        b"\r\nbody\rline\r\n.\r\nQUIT\r\n"
    )
    raw_session(filters.port, payload)
    [message] = sink.wait_for(1)
    assert "Authentication-Results" not in message
    assert message["Subject"] == "invoice Authentication-Results: mx.secumail.test; dmarc=pass"
    assert b"body line\r\n" in sink.handler.messages[0][1]


def test_commands_sent_in_one_group_are_answered_in_order(
    chain: StartChain, sink: SmtpSink
) -> None:
    """PIPELINING (RFC 2920), as Postfix uses it: MAIL, RCPT and DATA in one packet."""
    filters = chain()
    payload = (
        b"EHLO postfix.secumail.test\r\nMAIL FROM:<alice@secumail.test>\r\n"
        b"RCPT TO:<bob@secumail.test>\r\nRCPT TO:<refuse@secumail.test>\r\nDATA\r\n"
        b"Subject: grouped\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    answers = raw_session(filters.port, payload).decode()
    assert "250-PIPELINING" in answers
    codes = [line[:4] for line in answers.split("\r\n") if line[3:4] == " "]
    assert codes == ["220 ", "250 ", "250 ", "250 ", "550 ", "354 ", "250 ", "221 "]
    [message] = sink.wait_for(1)
    assert message["Subject"] == "grouped"
    assert [e.rcpt_tos for e in sink.envelopes] == [["bob@secumail.test"]]


def test_junk_on_the_port_does_not_stop_the_filter(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain()
    raw_session(filters.port, bytes(range(256)) * 64 + b"\r\n" + b"A" * 100000 + b"\r\n")
    assert filters.send(mail.plain()) == {}
    sink.wait_for(1)
    assert filters.clamav.proc.poll() is None


def test_a_line_that_never_ends_is_dropped(chain: StartChain, sink: SmtpSink) -> None:
    filters = chain()
    with socket.create_connection(("127.0.0.1", filters.port), timeout=30) as sock:
        sock.settimeout(30)
        answers = sock.recv(1000)
        try:
            for _ in range(64):  # 4 MiB, no line end
                sock.sendall(b"A" * 65536)
        except OSError:
            pass  # hung up on us before the end, as it should
        while chunk := sock.recv(65536):
            answers += chunk
    assert b"500 5.5.2 Line too long" in answers
    assert filters.clamav.logged("no line end in 65536 bytes")
    assert filters.send(mail.plain()) == {}
    sink.wait_for(1)


def test_big_mail_skips_spamassassin_but_not_clamav(chain: StartChain, sink: SmtpSink) -> None:
    chain(spam_max_size="20000").send(mail.gtube(body_padding=30_000))
    [message] = sink.wait_for(1)
    assert message["X-Spam-Status"].startswith("No, skipped:")
    assert message["X-Spam-Flag"] is None and message["X-AV-Checked"]


def session_from(source: str, port: int) -> tuple[bytes, bytes]:
    """The filter's greeting to a client connecting from `source` (a loopback address other
    than 127.0.0.1 stands for another host: the filters trust only 127.0.0.1, their own
    healthcheck, and the clients their settings name), and its answers to a relay attempt
    with XFORWARD, read until it hangs up or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.settimeout(10)
        greeting = b""
        while not (greeting.endswith(b"\r\n") and greeting[3:4] == b" "):
            if not (chunk := sock.recv(4096)):
                break
            greeting += chunk
        answers = b""
        try:
            sock.sendall(b"EHLO attacker.test\r\nXFORWARD ADDR=10.9.9.9\r\n"
                         b"MAIL FROM:<a@evil.test>\r\nRCPT TO:<x@external.test>\r\n")
            sock.settimeout(2)
            while chunk := sock.recv(4096):
                answers += chunk
        except OSError:
            pass  # reset, or quiet for 2 s
    return greeting, answers


def test_only_the_hosts_that_hand_a_filter_mail_may_use_it(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Issue 13, item 6: a filter relayed for whoever reached its port, into a next hop that
    trusts the filters' network (10027 relays anywhere), past every check, with XFORWARD
    taken from anyone. Now the second filter takes mail only from the first one's hosts."""
    filters = chain(spamd_allowed_clients="127.0.0.3", clamav_allowed_clients="127.0.0.3")
    spamd_port = int(filters.spamd.env["SECUMAIL_SPAMD_LISTEN"].rsplit(":", 1)[1])
    for port in (filters.port, spamd_port):
        greeting, answers = session_from("127.0.0.2", port)
        assert greeting.startswith(b"554 5.7.1 "), greeting
        assert answers == b""  # hung up: no EHLO, no XFORWARD, no MAIL taken
    greeting, answers = session_from("127.0.0.3", spamd_port)
    assert greeting.startswith(b"220 ") and b"250 " in answers
    assert filters.spamd.logged("client refused") and filters.spamd.logged("peer=127.0.0.2")
    # The chain itself (clamav filter -> spamd filter over 127.0.0.1) still works.
    filters.send(mail.plain())
    sink.wait_for(1)
    assert sink.envelopes[0].rcpt_tos == ["bob@secumail.test"]



def test_a_refused_client_that_talks_first_still_hears_why(chain: StartChain) -> None:
    """Commands sent before the greeting (spam bots do) are unread when the filter refuses
    the client: its 554 is written all the same, before it hangs up."""
    filters = chain(clamav_allowed_clients="127.0.0.3")
    with socket.create_connection(("127.0.0.1", filters.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"EHLO bot.test\r\nMAIL FROM:<a@evil.test>\r\nRCPT TO:<x@b.test>\r\n")
        heard = b""
        try:
            while chunk := sock.recv(4096):
                heard += chunk
        except OSError:
            pass  # reset: what came before it counts
    assert heard.startswith(b"554 5.7.1 "), heard
    assert b"250" not in heard


def test_clients_arriving_while_the_allowed_names_resolve_all_get_an_answer(
    chain: StartChain,
) -> None:
    """Connections that came while the filter resolved its allowed clients' names all waited
    for that one lookup, and all but the first were then left without a greeting (an error
    before it, until the 300 s idle timeout): in CI, 7 of 20 junk connections to the spamd
    filter. Here 8 clients from another host connect at once, before the first lookup."""
    filters = chain(spamd_allowed_clients="localhost")
    spamd_port = int(filters.spamd.env["SECUMAIL_SPAMD_LISTEN"].rsplit(":", 1)[1])
    for attempt in range(3):
        sockets = [socket.create_connection(("127.0.0.1", spamd_port), timeout=10,
                                            source_address=("127.0.0.2", 0)) for _ in range(8)]
        greetings = []
        for sock in sockets:
            with sock:
                try:
                    greetings.append(sock.recv(4096))
                except TimeoutError:
                    greetings.append(b"(nothing in 10 s)")
        assert all(g.startswith(b"554 5.7.1 ") for g in greetings), (attempt, greetings)
        time.sleep(AllowedClients.MISS_REFRESH)  # the next attempt makes a lookup again
    assert not filters.spamd.logged("checking client", timeout=0.5)


def test_dsn_parameters_are_taken_and_passed_on(chain: StartChain, sink: SmtpSink) -> None:
    """Before-queue, Postfix hands the filter the client's own MAIL and RCPT parameters: a
    relay that refused DSN's (aiosmtpd did: 555) would refuse every message asking for one."""
    filters = chain()
    with smtplib.SMTP("127.0.0.1", filters.port, timeout=30) as smtp:
        smtp.ehlo("mx.secumail.test")
        assert smtp.has_extn("dsn")
        assert smtp.mail("alice@secumail.test", ["RET=HDRS", "ENVID=Order+2B42"])[0] == 250
        assert smtp.rcpt("bob@secumail.test", ["NOTIFY=FAILURE,DELAY",
                                               "ORCPT=rfc822;Bob@secumail.test"])[0] == 250
        assert smtp.data(mail.plain())[0] == 250
        assert smtp.mail("alice@secumail.test", ["HOLDFOR=10"])[0] == 555
    sink.wait_for(1)


def test_dangerous_attachments_are_refused_or_stripped_and_say_which_rule(
    chain: StartChain, sink: SmtpSink
) -> None:
    """Issue 19: invoice.pdf.exe in a zip, through the real filter (real clamd beside it)."""
    archive = mail.zipped([("invoice.pdf.exe", mail.PROGRAM)])
    message = mail.attaching([("report.txt", b"numbers"), ("invoice.zip", archive)])
    refusing = chain(attachment_action="reject")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        refusing.send(message)
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error == (
        b"5.7.1 Message refused: attachment not allowed "
        b"(double-extension: invoice.zip > invoice.pdf.exe)")
    assert refusing.clamav.logged("verdict=attachment")
    assert ('secumail_filter_attachment_findings_total{rule="double-extension"} 1.0'
            in scrape(refusing.clamav.metrics_port))
    stripping = chain(attachment_action="strip")
    stripping.send(message)
    [delivered] = sink.wait_for(1)
    assert delivered["X-SecuMail-Attachments"].startswith(
        "removed: double-extension: invoice.zip > invoice.pdf.exe")
    names = [part.get_filename() for part in delivered.walk()]
    assert "report.txt" in names and "invoice.zip" not in names
    assert b"MZ" not in delivered.as_bytes()


def test_ways_around_the_attachment_rules_are_closed(chain: StartChain, sink: SmtpSink) -> None:
    """Issue 30: each of these carried a program through the real filter before the fix."""
    program = [("invoice.pdf.exe", mail.PROGRAM)]
    attacks = {
        "zip after junk": mail.attaching([("scan.dat", b"junk" * 500 + mail.zipped(program))]),
        "v7 tar": mail.attaching([("scan.dat", mail.zipped(program, "v7tar"))]),
        "cpio": mail.attaching([("scan.dat", mail.zipped(program, "cpio_newc"))]),
        "tar.zst": mail.attaching([("scan.dat", mail.zipped(program, "ustar",
                                                           filter_name="zstd"))]),
        "unquoted encoded word": mail.with_part(
            "Content-Type: text/plain\nContent-Disposition: attachment; "
            "filename==?utf-8?Q?setup=2Eexe?=", b"harmless"),
        "name beside filename": mail.with_part(
            "Content-Type: application/pdf; name=setup.exe\n"
            "Content-Disposition: attachment; filename=report.pdf", b"%PDF-1.4"),
    }
    filters = chain(attachment_action="reject")
    for attack, message in attacks.items():
        with pytest.raises(smtplib.SMTPDataError) as refused:
            filters.send(message)
        assert refused.value.smtp_code == 554, attack
        assert b"attachment not allowed" in refused.value.smtp_error, attack
    filters.send(mail.plain())
    assert len(sink.wait_for(1)) == 1


def test_a_virus_is_named_a_virus_even_with_a_banned_name(
    chain: StartChain, sink: SmtpSink
) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        chain().send(mail.with_attachment("clam.exe"))
    assert b"virus found (ClamAV-Test-File" in refused.value.smtp_error


def test_a_kept_connection_that_refuses_a_message_is_replaced_not_blamed(
    chain: StartChain,
) -> None:
    """Issue 32, item 3: the next hop's session on a kept connection answers every message
    451 (Postfix's 10027 smtpd whose milter connection died with a restarted milter). The
    filter takes the same transaction to a new connection: the client hears 250, the next
    hop has each message once."""

    class StaleSessions:
        def __init__(self) -> None:
            self.subjects: list[str] = []
            self.refused = 0

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            count = getattr(session, "messages", 0)
            session.messages = count + 1  # type: ignore[attr-defined]
            if count:  # this connection carried a message before: its session is stale
                self.refused += 1
                return "451 4.7.1 Service unavailable - try again later"
            content = envelope.content  # type: ignore[attr-defined]
            self.subjects.append(message_from_bytes(content)["Subject"])
            return "250 2.0.0 Ok: queued as 4B2C"

    hop = StaleSessions()
    filters = three_messages_through(chain, hop)
    assert hop.refused == 2  # the kept connection refused each later one once
    assert filters.spamd.logged("kept next-hop connection refused a message")


def three_messages_through(chain: StartChain, hop: Any) -> Chain:
    """Three messages through the filters to `hop` (an aiosmtpd handler with `subjects`):
    each accepted from the client and delivered once. The filters, for more checks."""
    from aiosmtpd.controller import Controller

    controller = Controller(hop, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        filters = chain(spamd_next_hop=f"127.0.0.1:{controller.port}")
        for n in range(3):
            assert filters.send(mail.plain(subject=f"message {n}")) == {}
        assert hop.subjects == ["message 0", "message 1", "message 2"]
        return filters
    finally:
        controller.stop()


def test_a_kept_connection_that_refuses_mail_from_is_replaced_not_blamed(
    chain: StartChain,
) -> None:
    """Issue 32, item 3: Postfix's 10027 smtpd whose milter died meanwhile (a milter replica
    restarted, its drain over) answers the next transaction of the session 451 at MAIL
    FROM already. A kept connection refusing MAIL is closed and the transaction starts on
    another one: the client hears 250, never the stale session's 451."""

    class StaleSessions:
        def __init__(self) -> None:
            self.subjects: list[str] = []
            self.refused = 0

        async def handle_MAIL(self, server: object, session: object, envelope: object,
                              address: str, options: list[str]) -> str:
            if getattr(session, "messages", 0):  # carried a message before: stale now
                self.refused += 1
                return "451 4.7.1 Service unavailable - try again later"
            envelope.mail_from = address  # type: ignore[attr-defined]
            return "250 2.1.0 Ok"

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            session.messages = 1  # type: ignore[attr-defined]
            self.subjects.append(message_from_bytes(envelope.content)["Subject"])  # type: ignore[attr-defined]
            return "250 2.0.0 Ok: queued as 4B2C"

    hop = StaleSessions()
    filters = three_messages_through(chain, hop)
    assert hop.refused == 2  # each kept connection refused MAIL once, then was dropped
    assert filters.spamd.logged("kept next-hop connection refused MAIL")
