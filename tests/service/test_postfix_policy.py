"""A real Postfix consults the real policy service through check_policy_service."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.dnsserver import LoopbackDNS
from testkit.postfix import PostfixInstance, sink_transport
from testkit.processes import Daemon, free_port, policy_env, start_policy
from testkit.sink import SmtpSink

DELAY = 2


@pytest.fixture(params=["all"])
def chain(
    request: pytest.FixtureRequest, tmp_path: Path, dns_server: LoopbackDNS
) -> Iterator[tuple[PostfixInstance, SmtpSink]]:
    dns_server.add("remote.test", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    dns_server.add("bank.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    dns_server.add("mail.remote.test", "A", "203.0.113.7")
    policy_port = free_port()
    policy: Daemon = start_policy(
        policy_env(
            policy_port,
            f"sqlite:///{tmp_path}/grey.sqlite",
            dns_server.spec,
            greylist_delay=str(DELAY),
            greylist_mode=request.param,
        )
    )
    sink = SmtpSink().start()
    service = f"check_policy_service inet:127.0.0.1:{policy_port}"
    postfix = PostfixInstance(
        {
            **sink_transport(sink.port),
            "smtpd_recipient_restrictions": (
                f"permit_mynetworks, reject_unauth_destination, {service}"
            ),
            "smtpd_data_restrictions": service,
        }
    ).start()
    yield postfix, sink
    postfix.stop()
    sink.stop()
    policy.stop()


def send_as_remote(
    port: int, sender: str, client: str = "203.0.113.7", name: str = "mail.remote.test",
    helo: str = "mail.remote.test",
) -> tuple[int, bytes]:
    """One SMTP transaction, appearing through XCLIENT as a remote client; RCPT's reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("test-client.secumail.test")
        code, reply = smtp.docmd("XCLIENT", f"ADDR={client} NAME={name} REVERSE_NAME={name}")
        assert code == 220, reply
        smtp.ehlo(helo)
        smtp.mail(sender)
        code, reply = smtp.rcpt("bob@secumail.test")
        if code == 250:
            smtp.data(b"From: " + sender.encode() + b"\r\nSubject: hello\r\n\r\nHi Bob.\r\n")
        return code, reply


def test_first_attempt_greylisted_retry_delivered_with_headers(
    chain: tuple[PostfixInstance, SmtpSink],
) -> None:
    postfix, sink = chain
    code, reply = send_as_remote(postfix.port, "alice@remote.test")
    assert code == 450 and b"Greylisted" in reply, reply
    time.sleep(DELAY + 0.5)
    code, reply = send_as_remote(postfix.port, "alice@remote.test")
    assert code == 250, reply
    [message] = sink.wait_for(1)
    assert message["X-Greylist"].startswith(f"delayed {DELAY} seconds by SecuMail")
    assert message["Received-SPF"].startswith("pass (mx.secumail.test: domain of remote.test")
    assert message["Subject"] == "hello"


def test_spf_fail_is_refused_by_postfix(chain: tuple[PostfixInstance, SmtpSink]) -> None:
    postfix, _ = chain
    code, reply = send_as_remote(postfix.port, "ceo@bank.test")
    assert code == 550 and b"5.7.23" in reply and b"SPF check failed: domain of bank.test" in reply
    postfix.wait_for_log("SPF check failed: domain of bank.test does not designate 203.0.113.7")


@pytest.mark.parametrize("chain", ["selective"], indirect=True)
def test_selective_greylisting_passes_a_provider_and_delays_a_bot(
    chain: tuple[PostfixInstance, SmtpSink],
) -> None:
    """Postfix's own client_name and reverse_client_name reach the scoring."""
    postfix, sink = chain
    code, reply = send_as_remote(postfix.port, "alice@remote.test")  # FCrDNS, SPF pass
    assert code == 250, reply
    [message] = sink.wait_for(1)
    assert message["X-Greylist"].startswith(
        "not delayed by SecuMail at mx.secumail.test, score -1 (spf-pass -1); ")
    bot = {"client": "203.0.113.99", "name": "[UNAVAILABLE]", "helo": "x7gq2.remote.test"}
    code, reply = send_as_remote(postfix.port, "promo@remote.test", **bot)
    assert code == 450 and b"Greylisted" in reply, reply  # 2 + 1 - 1: at the threshold


def test_our_own_host_is_deferred_at_its_outbound_limit_and_outside_mail_never_counts(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    """Postfix as rendered (the restriction class, the trusted networks' map) and the real
    policy service: a host of ours sending each message from a new sender address, to stay
    under the per-sender limit, is deferred at exactly its client limit; mail from outside
    is not counted against it."""
    from secumail.settings import Settings
    from services.postfix.render import OUTBOUND_CLIENTS_MAP, main_cf, outbound_clients_map

    limits = "sender:messages:10/hour,client:messages:3/hour"
    policy_port = free_port()
    policy = start_policy(policy_env(
        policy_port, f"sqlite:///{tmp_path}/grey.sqlite", dns_server.spec,
        greylist_enabled="false", spf_enabled="false", outbound_limits=limits))
    settings = Settings(policy_address=f"127.0.0.1:{policy_port}", outbound_limits=limits)
    rendered = main_cf(settings)
    clients = tmp_path / "outbound_clients"
    clients.write_text(outbound_clients_map(settings))
    sink = SmtpSink().start()
    postfix = PostfixInstance({
        **sink_transport(sink.port),
        "smtpd_restriction_classes": rendered["smtpd_restriction_classes"],
        "secumail_outbound": rendered["secumail_outbound"],
        "smtpd_relay_restrictions": rendered["smtpd_relay_restrictions"].replace(
            OUTBOUND_CLIENTS_MAP, str(clients)),
        "smtpd_recipient_restrictions": rendered["smtpd_recipient_restrictions"].replace(
            "reject_unknown_recipient_domain, ", ""),
    }).start()
    try:
        replies = [send_as_remote(postfix.port, f"s{n}@secumail.test", client="127.0.0.5",
                                  name="host.secumail.test") for n in range(5)]
        assert [code for code, _ in replies] == [250, 250, 250, 450, 450], replies
        assert replies[3][1].startswith(b"4.7.1 ") and (
            b"Outbound limit reached: 3 messages per hour for client:127.0.0.5"
            in replies[3][1]), replies[3]
        outside = [send_as_remote(postfix.port, "alice@remote.test") for _ in range(4)]
        assert [code for code, _ in outside] == [250] * 4, outside
        sink.wait_for(7)
        postfix.wait_for_log("Outbound limit reached: 3 messages per hour")
        assert policy.logged("check=outbound")
    finally:
        postfix.stop()
        sink.stop()
        policy.stop()
