"""A real Postfix with `smtpd_milters = inet:127.0.0.1:PORT` and the real DKIM milter (and
the real policy service, for Received-SPF): outbound mail leaves signed, inbound mail gets
Authentication-Results, tampered mail fails, DMARC p=reject can be enforced."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from secumail.dns import make_resolver
from secumail.netaddr import parse_host_port
from services.dkim import keys
from services.dkim.dnslookup import dkimpy_dnsfunc
from tests.support.dkim import dkim_env, keygen, record_from_output, start_dkim
from tests.support.dnsserver import LoopbackDNS
from tests.support.postfix import PostfixInstance
from tests.support.processes import Daemon, free_port, policy_env, start_policy
from tests.support.sink import SmtpSink

REMOTE_CLIENT = "203.0.113.7"


def txt(value: str) -> str:
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


@dataclass
class Chain:
    postfix: PostfixInstance
    sink: SmtpSink
    dns: LoopbackDNS
    dkim_daemon: Daemon
    remote_key: keys.PrivateKey  # remote.test's key, published as "rk"

    def dnsfunc(self) -> Callable[..., bytes | None]:
        """dkimpy's DNS function, aimed at the tests' server through SecuMail's resolver."""
        return dkimpy_dnsfunc(make_resolver([parse_host_port(self.dns.spec)], 2))

    def sign_as_remote(self, message: bytes) -> bytes:
        pem = self.remote_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        return dkim.sign(message, b"rk", b"remote.test", pem,  # type: ignore[no-any-return]
                         canonicalize=(b"relaxed", b"simple")) + message


def start_chain(tmp_path: Path, dns: LoopbackDNS, **dkim_overrides: str) -> Iterator[Chain]:
    dns.add("remote.test", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    dns.add("_dmarc.remote.test", "TXT", '"v=DMARC1; p=reject"')
    dns.add("_dmarc.bank.test", "TXT", '"v=DMARC1; p=reject"')
    dns.add("_dmarc.secumail.test", "TXT", '"v=DMARC1; p=quarantine"')
    keys_dir = tmp_path / "keys"
    for args in (("--selector", "s1"), ("--selector", "e1", "--type", "ed25519")):
        name, value = record_from_output(keygen(keys_dir, "keygen", "secumail.test", *args))
        dns.add(name, "TXT", txt(value))
    remote_key = keys.generate_key("rsa", 2048)
    dns.add("rk._domainkey.remote.test", "TXT", txt(keys.txt_record_value(remote_key)))

    policy_port, dkim_port = free_port(), free_port()
    policy = start_policy(policy_env(policy_port, f"sqlite:///{tmp_path}/grey.sqlite",
                                     dns.spec, greylist_enabled="false"))
    milter = start_dkim(dkim_env(dkim_port, keys_dir, dns.spec, **dkim_overrides))
    sink = SmtpSink().start()
    service = f"check_policy_service inet:127.0.0.1:{policy_port}"
    route = f"smtp:[127.0.0.1]:{sink.port}"
    postfix = PostfixInstance({
        "relay_domains": "secumail.test, remote.test",
        "transport_maps": f"inline:{{ secumail.test={route}, remote.test={route} }}",
        "smtpd_recipient_restrictions": (
            f"permit_mynetworks, reject_unauth_destination, {service}"),
        "smtpd_data_restrictions": service,
        "smtpd_milters": f"inet:127.0.0.1:{dkim_port}",
        "milter_default_action": "tempfail",
    }).start()
    yield Chain(postfix, sink, dns, milter, remote_key)
    postfix.stop()
    sink.stop()
    milter.stop()
    policy.stop()


@pytest.fixture
def chain(tmp_path: Path, dns_server: LoopbackDNS) -> Iterator[Chain]:
    yield from start_chain(tmp_path, dns_server)


def send(port: int, sender: str, recipient: str, message: bytes,
         client: str | None = None) -> None:
    """One SMTP transaction; through XCLIENT it looks like it comes from `client`."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.secumail.test")
        if client:
            code, reply = smtp.docmd("XCLIENT", f"ADDR={client} NAME=mail.remote.test")
            assert code == 220, reply
            smtp.ehlo("mail.remote.test")
        smtp.sendmail(sender, [recipient], message)


def delivered(chain: Chain, count: int) -> tuple[Message, bytes]:
    messages = chain.sink.wait_for(count)
    return messages[-1], chain.sink.handler.messages[count - 1][1]


OUTBOUND = (
    b"From: Alice <alice@secumail.test>\r\nTo: bob@remote.test\r\nSubject: report\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <o1@secumail.test>\r\n\r\n"
    b"The report is attached.  \r\n\r\n"
)
INBOUND = (
    b"From: Carol <carol@remote.test>\r\nTo: bob@secumail.test\r\nSubject: invoice\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <i1@remote.test>\r\n\r\n"
    b"Please pay 100 EUR.\r\n"
)


def test_outbound_mail_leaves_signed(chain: Chain) -> None:
    send(chain.postfix.port, "alice@secumail.test", "bob@remote.test", OUTBOUND)
    message, raw = delivered(chain, 1)
    signatures = message.get_all("DKIM-Signature")
    assert len(signatures) == 2
    assert "a=rsa-sha256" in signatures[0] and "a=ed25519-sha256" in signatures[1]
    assert raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    checker = dkim.DKIM(raw)
    for index in (0, 1):
        assert checker.verify(index, dnsfunc=chain.dnsfunc())
    assert "Authentication-Results" not in message
    assert chain.dkim_daemon.logged("mode=sign action=continue")


def test_inbound_mail_gets_authentication_results(chain: Chain) -> None:
    forged = b"Authentication-Results: mx.secumail.test; dkim=pass header.d=bank.test\r\n"
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         forged + chain.sign_as_remote(INBOUND), client=REMOTE_CLIENT)
    message, raw = delivered(chain, 1)
    [results] = message.get_all("Authentication-Results")  # the forged one is gone
    entries = [e.strip() for e in results.split(";")]
    assert entries[0] == "mx.secumail.test"
    assert entries[1].startswith("dkim=pass (2048-bit rsa key) header.d=remote.test")
    assert entries[2] == "spf=pass smtp.mailfrom=remote.test"
    assert entries[3] == "dmarc=pass (p=reject dis=none) header.from=remote.test"
    assert raw.startswith(b"Authentication-Results: mx.secumail.test;\r\n\tdkim=pass")
    assert b"bank.test" not in raw
    assert message["Received-SPF"].startswith("pass ")


def test_tampered_body_gets_dkim_fail(chain: Chain) -> None:
    signed = chain.sign_as_remote(INBOUND).replace(b"100 EUR", b"900 EUR")
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test", signed,
         client=REMOTE_CLIENT)
    message, _ = delivered(chain, 1)
    results = message["Authentication-Results"]
    assert 'dkim=fail (2048-bit rsa key) reason="body hash did not verify"' in results
    # SPF still passes and is aligned: DMARC passes on it.
    assert "dmarc=pass" in results


def test_dmarc_reject_refuses_spoofed_mail(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    for chain in start_chain(tmp_path, dns_server, dmarc_reject="true"):
        spoofed = INBOUND.replace(b"carol@remote.test", b"ceo@bank.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(chain.postfix.port, "billing@elsewhere.test", "bob@secumail.test", spoofed,
                 client=REMOTE_CLIENT)
        assert refused.value.smtp_code == 550
        assert b"5.7.1 Email rejected per DMARC policy for bank.test" in refused.value.smtp_error
        assert chain.sink.handler.messages == []
