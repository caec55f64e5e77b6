"""A real Postfix with `smtpd_milters = inet:127.0.0.1:PORT` and the real DKIM milter (and
the real policy service, for Received-SPF): outbound mail leaves signed, inbound mail gets
Authentication-Results, tampered mail fails, DMARC p=reject can be enforced."""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from secumail import dkim_keys as keys
from secumail.dmarc_reports import ReportStore, day_of
from secumail.dns import make_resolver
from secumail.netaddr import parse_host_port
from secumail.txt_lookup import dkimpy_dnsfunc
from testkit.dkim import dkim_env, keygen, record_from_output, start_dkim
from testkit.dnsserver import LoopbackDNS
from testkit.postfix import PostfixInstance
from testkit.processes import Daemon, free_port, policy_env, start_policy
from testkit.sink import SmtpSink

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


def start_chain(tmp_path: Path, dns: LoopbackDNS, policy_spf: str = "true",
                **dkim_overrides: str) -> Iterator[Chain]:
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
                                     dns.spec, greylist_enabled="false",
                                     spf_enabled=policy_spf))
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


def test_dmarc_checks_are_counted_for_the_domains_reports(tmp_path: Path,
                                                          dns_server: LoopbackDNS) -> None:
    """Issue 33: the real milter counts each DMARC check of a domain that asks for reports,
    and stores the counts (at the latest when it stops)."""
    db = tmp_path / "dmarc" / "reports.sqlite"
    for chain in start_chain(tmp_path, dns_server, dmarc_reject="true", dmarc_reports="true",
                             dmarc_report_db=str(db)):
        dns_server.resolver.records[("_dmarc.bank.test", "TXT")] = [
            '"v=DMARC1; p=reject; rua=mailto:d@bank.test"']
        spoofed = INBOUND.replace(b"carol@remote.test", b"ceo@bank.test")
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError):
                send(chain.postfix.port, "billing@elsewhere.test", "bob@secumail.test", spoofed,
                     client=REMOTE_CLIENT)
        send(chain.postfix.port, "carol@remote.test", "bob@secumail.test", INBOUND,
             client=REMOTE_CLIENT)  # remote.test publishes no rua: not counted
    store = ReportStore(str(db))
    assert store.pending("2999-01-01") == [(day_of(time.time()), "bank.test")]
    [(check, count)] = store.rows(day_of(time.time()), "bank.test")
    assert count == 2 and check.disposition == "reject" and check.source_ip == REMOTE_CLIENT
    assert (check.dkim_aligned, check.spf_aligned) == (False, False)
    assert check.spf == ("elsewhere.test", "mfrom", "none")


def test_mail_we_forward_leaves_arc_sealed(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    """Issue 33: with SECUMAIL_ARC_SEAL_DOMAINS, the milter asks Postfix for the recipients
    and seals mail from outside to such a domain; dkimpy verifies the chain it made."""
    for chain in start_chain(tmp_path, dns_server, arc_seal_domains="secumail.test"):
        signed = chain.sign_as_remote(INBOUND)
        send(chain.postfix.port, "carol@remote.test", "bob@secumail.test", signed,
             client=REMOTE_CLIENT)
        _, raw = delivered(chain, 1)
        assert b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=secumail.test; s=s1;" in raw
        cv, _, reason = dkim.arc_verify(raw, dnsfunc=chain.dnsfunc())
        assert cv == b"pass", reason
        send(chain.postfix.port, "alice@secumail.test", "bob@remote.test", OUTBOUND)
        _, ours = delivered(chain, 2)
        assert b"ARC-Seal" not in ours  # our own mail is signed, not sealed


# --- Forged verdicts (issue 13, items 1 to 5): each attack through the real Postfix -------------

FORGED_RESULTS = (
    b"Authentication-Results: mx.secumail.test; dkim=pass header.d=paypal.test;"
    b" spf=pass smtp.mailfrom=paypal.test; dmarc=pass header.from=paypal.test\r\n"
)
PAYPAL = (
    b"From: PayPal <service@paypal.test>\r\nTo: bob@secumail.test\r\nSubject: your account\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <p1@paypal.test>\r\n\r\n"
    b"Please log in at http://paypal.test.evil.test/ to keep your account.\r\n"
)


def refused_data(chain: Chain, sender: str, message: bytes,
                 client: str = REMOTE_CLIENT) -> smtplib.SMTPDataError:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(chain.postfix.port, sender, "bob@secumail.test", message, client=client)
    assert chain.sink.handler.messages == []
    return refused.value


def test_a_huge_header_block_is_refused_not_waved_through(chain: Chain) -> None:
    """2,100 header fields used to make the milter skip the message: no verification, the
    forged results kept. Now the session refuses it (552 5.6.0) and logs why."""
    padded = b"X-Pad: 1\r\n" * 2100 + FORGED_RESULTS + PAYPAL
    refused = refused_data(chain, "billing@remote.test", padded)
    assert refused.smtp_code == 552
    assert b"5.6.0 Message header block too large" in refused.smtp_error
    assert chain.dkim_daemon.logged("action=reject")


@pytest.mark.parametrize(
    "authserv_id",
    [
        b"(x;y) mx.secumail.test",
        b"(a (nested; comment) b) MX.SecuMail.Test",
        b'"mx.secumail.test"',
        b'"mx.secumail\\.test" 1',
        b"\r\n\tmx.secumail.test (the real one)",
        b"mx.secumail.test.",
    ],
    ids=["comment", "nested-comment", "quoted", "quoted-pair-and-version", "folded",
         "trailing-dot"],
)
def test_forged_results_are_removed_whatever_their_spelling(
    chain: Chain, authserv_id: bytes
) -> None:
    forged = (b"Authentication-Results: " + authserv_id
              + b"; dkim=pass header.d=paypal.test; dmarc=pass\r\n")
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         forged + chain.sign_as_remote(INBOUND), client=REMOTE_CLIENT)
    message, raw = delivered(chain, 1)
    [results] = message.get_all("Authentication-Results")  # ours only
    assert results.startswith("mx.secumail.test;")
    assert b"paypal.test" not in raw


@pytest.mark.parametrize("name", [b"Authentication-Results :", b"authentication-results:"])
def test_forged_results_are_removed_whatever_their_header_name(chain: Chain, name: bytes) -> None:
    forged = name + b" mx.secumail.test; dkim=pass header.d=paypal.test\r\n"
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         forged + chain.sign_as_remote(INBOUND), client=REMOTE_CLIENT)
    _, raw = delivered(chain, 1)
    assert b"paypal.test" not in raw


def test_results_of_other_hosts_are_kept(chain: Chain) -> None:
    upstream = b"Authentication-Results: (mx.secumail.test) relay.remote.test; dkim=none\r\n"
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         upstream + chain.sign_as_remote(INBOUND), client=REMOTE_CLIENT)
    message, _ = delivered(chain, 1)
    assert len(message.get_all("Authentication-Results")) == 2


FORGED_SPF = (
    b"Received-SPF: pass (mx.secumail.test: domain of ceo@bank.test designates 203.0.113.7"
    b" as permitted sender) client-ip=203.0.113.7; envelope-from=\"ceo@bank.test\";"
    b" helo=mail.remote.test; receiver=mx.secumail.test; identity=mailfrom\r\n"
)
CEO = INBOUND.replace(b"carol@remote.test", b"ceo@bank.test")


@pytest.mark.parametrize("milter_spf", ["true", "false"])
def test_a_received_spf_written_by_the_client_is_never_trusted(
    tmp_path: Path, dns_server: LoopbackDNS, milter_spf: str
) -> None:
    """The policy service adds no Received-SPF (SPF off there); the client wrote its own.
    DMARC must not pass on it, whether the milter checks SPF itself or not at all."""
    dns_server.add("bank.test", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')
    for chain in start_chain(tmp_path, dns_server, dmarc_reject="true", spf_enabled=milter_spf,
                             policy_spf="false"):
        refused = refused_data(chain, "ceo@bank.test", FORGED_SPF + CEO)
        assert refused.smtp_code == 550
        assert b"DMARC policy for bank.test" in refused.smtp_error


@pytest.mark.parametrize(
    "froms",
    [
        b"From: ceo@bank.test\r\nFrom: carol@remote.test\r\n",
        b"From: carol@remote.test\r\nFrom: ceo@remote.test\r\n",
        b"From: carol@remote.test, ceo@bank.test\r\n",
    ],
    ids=["two-domains", "same-domain", "one-field-two-domains"],
)
def test_a_message_without_exactly_one_author_domain_is_refused(
    chain: Chain, froms: bytes
) -> None:
    """RFC 7489 6.6.1: DMARC needs one From domain. Two From fields used to give permerror
    (which never rejects) or, with one domain, a replayed signed message gained a From.
    (A message with no From at all gets one from this test Postfix, made of the envelope
    sender: that case is in the milter's unit tests.)"""
    signed = chain.sign_as_remote(INBOUND)
    message = froms + b"\r\n".join(
        line for line in signed.split(b"\r\n") if not line.startswith(b"From:"))
    refused = refused_data(chain, "carol@remote.test", message)
    assert refused.smtp_code == 550
    assert b"5.7.1" in refused.smtp_error and b"From" in refused.smtp_error


def sign_with_tags(chain: Chain, message: bytes, **tags: bytes) -> bytes:
    """The remote signature with some tags rewritten or added (it then need not verify)."""
    signed = chain.sign_as_remote(message)
    header, _, rest = signed.partition(b"\r\n\r\n")
    for name, value in tags.items():
        tag = rb"(\b" + name.encode() + rb"=)[^;]*"
        if re.search(tag, header):
            header = re.sub(tag, rb"\g<1>" + value, header, count=1)
        else:
            header = header.replace(b"v=1;", b"v=1; " + name.encode() + b"=" + value + b";", 1)
    return header + b"\r\n\r\n" + rest


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"l": b""}, 'reason="l= is not a number"'),
        ({"s": b"bad..selector"}, 'reason="s= is not a valid selector"'),
        ({"s": b"-x"}, 'reason="s= is not a valid selector"'),
    ],
    ids=["empty-l", "empty-label-selector", "hyphen-selector"],
)
def test_malformed_signature_tags_are_permanent_errors(
    chain: Chain, tags: dict[str, bytes], reason: str
) -> None:
    """An empty l= used to drop the milter's connection (451 for ever) and a selector that is
    not a DNS name was taken for a DNS outage (451 for ever): both are dkim=permerror."""
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         sign_with_tags(chain, INBOUND, **tags), client=REMOTE_CLIENT)
    message, _ = delivered(chain, 1)
    results = message["Authentication-Results"]
    assert "dkim=permerror" in results and reason in results


def test_text_appended_after_an_l_limited_signature_is_no_dmarc_pass(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    """l= lets anyone append text to a signed message. Such a signature is dkim=policy, not a
    pass that DMARC could align on (here SPF is no help: another envelope domain)."""
    for chain in start_chain(tmp_path, dns_server, dmarc_reject="true"):
        pem = chain.remote_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        signature = dkim.sign(INBOUND, b"rk", b"remote.test", pem, length=True)
        appended = signature + INBOUND + b"Pay to IBAN XX00 EVIL instead.\r\n"
        refused = refused_data(chain, "bounce@elsewhere.test", appended)
        assert refused.smtp_code == 550
        assert chain.dkim_daemon.logged("dkim=policy:remote.test")


def test_our_own_domain_from_outside_is_refused_in_the_session_unless_signed_by_us(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    """Issue 30: `From: CEO <ceo@secumail.test>` from a client on the Internet was delivered
    as if the CEO wrote it (the envelope check covers MAIL FROM only)."""
    for chain in start_chain(tmp_path, dns_server, domains="secumail.test"):
        ceo = OUTBOUND.replace(b"Alice <alice@secumail.test>", b"CEO <ceo@secumail.test>")
        refusal = refused_data(chain, "billing@elsewhere.test", ceo)
        assert refusal.smtp_code == 550
        assert refusal.smtp_error == (b"5.7.1 Message refused: From secumail.test: your own "
                                      b"domain from outside, not signed with its key")
        assert chain.dkim_daemon.logged("action=reject")
        # Our own mail, signed on its way out, coming back through a forwarder: delivered.
        send(chain.postfix.port, "alice@secumail.test", "bob@remote.test", OUTBOUND)
        _, signed = delivered(chain, 1)
        send(chain.postfix.port, "fwd@remote.test", "bob@secumail.test", signed,
             client=REMOTE_CLIENT)
        message, _ = delivered(chain, 2)
        assert "dkim=pass" in message["Authentication-Results"]


@pytest.mark.parametrize(
    "authserv_id",
    ["\u00a0mx.secumail.test", "mx.secumail.test\u3000",
     '(x)\u2003\u200b"mx.secumail\\.test"\ufeff 1'],
    ids=["nbsp-before", "ideographic-space-after", "em-and-zero-width-space-quoted"],
)
def test_forged_results_next_to_unicode_blanks_are_removed(
    chain: Chain, authserv_id: str
) -> None:
    """Issue 30: a mail client shows U+00A0 or U+3000 as a space, U+200B or U+FEFF as
    nothing, so these headers show our authserv-id; they used to be read as another host's
    and were delivered with their dkim=pass for paypal.test."""
    forged = ("Authentication-Results: " + authserv_id
              + "; dkim=pass header.d=paypal.test; dmarc=pass\r\n").encode()
    send(chain.postfix.port, "carol@remote.test", "bob@secumail.test",
         forged + chain.sign_as_remote(INBOUND), client=REMOTE_CLIENT)
    message, raw = delivered(chain, 1)
    kept = [line for line in raw.split(b"\r\n") if b"paypal.test" in line]
    assert kept == [], f"a forged one was kept: {kept}"
    [results] = message.get_all("Authentication-Results") or []  # ours only
    assert results.startswith("mx.secumail.test;")


@pytest.mark.parametrize(
    "added",
    [b"Reply-To: payments@evil.test\r\n", b"Subject: Urgent: our new bank details\r\n",
     b"Cc: everyone@remote.test\r\n"],
    ids=["reply-to", "second-subject", "cc"],
)
def test_a_field_added_to_our_signed_mail_breaks_both_signatures(
    chain: Chain, added: bytes
) -> None:
    """Issue 30: only From was over-signed, so anyone holding a message we signed could put a
    Reply-To (or a second Subject, a Cc) above the signed fields and pass it on with our
    signatures still verifying. Verified here by dkimpy, an independent implementation."""
    send(chain.postfix.port, "alice@secumail.test", "bob@remote.test", OUTBOUND)
    _, raw = delivered(chain, 1)
    for index in (0, 1):  # rsa-sha256 and ed25519-sha256
        assert dkim.DKIM(raw).verify(index, dnsfunc=chain.dnsfunc())
        assert not dkim.DKIM(added + raw).verify(index, dnsfunc=chain.dnsfunc())


def test_a_list_sealed_with_arc_is_delivered_past_dmarc_reject_only_when_trusted(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    """Issue 33: Carol's signed mail through a mailing list (subject tag, footer: DKIM and
    SPF fail, DMARC p=reject fails), sealed by the list with dkimpy. Through the real Postfix
    and milter: delivered with arc=pass and the override when the list is a trusted sealer;
    the same chain forged with another key under the list's name is refused."""
    list_key = keys.generate_key("rsa", 2048)
    dns_server.add("arc._domainkey.lists.test", "TXT", txt(keys.txt_record_value(list_key)))
    for chain in start_chain(tmp_path, dns_server, dmarc_reject="true",
                             arc_trusted_sealers="lists.test"):
        posted = chain.sign_as_remote(INBOUND).replace(b"Subject: invoice",
                                                       b"Subject: [list] invoice")
        posted += b"-- \r\nThe list\r\n"

        def sealed(key: keys.PrivateKey, posted: bytes = posted) -> bytes:
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            stamped = (b"Authentication-Results: lists.test; dkim=pass header.d=remote.test;"
                       b" dmarc=pass header.from=remote.test\r\n" + posted)
            return b"".join(dkim.arc_sign(stamped, b"arc", b"lists.test", pem,
                                          b"lists.test")) + stamped

        send(chain.postfix.port, "list-bounces@lists.test", "bob@secumail.test",
             sealed(list_key), client="198.51.100.20")
        message, _ = delivered(chain, 1)
        results = message["Authentication-Results"]
        assert "arc=pass (1 set) smtp.remote-ip=198.51.100.20 header.oldest-pass=0" in results
        assert "policy.override=arc header.from=remote.test" in results
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(chain.postfix.port, "list-bounces@lists.test", "bob@secumail.test",
                 sealed(keys.generate_key("rsa", 2048)), client="198.51.100.20")
        assert b"5.7.1 Email rejected per DMARC policy for remote.test" in \
            refused.value.smtp_error
        assert len(chain.sink.handler.messages) == 1
