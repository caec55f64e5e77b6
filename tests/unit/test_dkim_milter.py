"""The milter session without sockets: codec commands in, reply packets out, a fake DNS."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import dkim
import pytest

from secumail import dkim_keys as keys
from secumail.dns import DnsTemporaryError
from secumail.protocols import milter as mc
from secumail.settings import Settings
from services.dkim.milter import WANTED_PROTOCOL, DkimMilter, MilterSession, Outcome

HOST = "mx.secumail.test"
POSTFIX_OFFER = mc.OptionNegotiation(6, 0x1FF, 0x1FFFFF)


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.queries: list[str] = []

    async def __call__(self, name: str) -> list[str] | None:
        self.queries.append(name)
        if name in self.failing:
            raise DnsTemporaryError(f"{name}: Timeout")
        return self.records.get(name)


class FakeSpf:
    """This host's SPF check: a result per client address (none by default), or a failure."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}
        self.failing = False
        self.queries: list[tuple[str, str, str]] = []

    async def __call__(self, client: str, sender: str, helo: str) -> str:
        self.queries.append((client, sender, helo))
        if self.failing:
            raise TimeoutError("SPF lookups timed out")
        return self.results.get(client, "none")


class Harness:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.dns = FakeDns()
        self.spf = FakeSpf()
        self.keys_dir = tmp_path / "keys"
        overrides.setdefault("domains", ["secumail.test"])  # example.org is elsewhere here
        self.settings = Settings(hostname=HOST, dkim_keys_dir=str(self.keys_dir),
                                 **overrides)  # type: ignore[arg-type]
        self.outcomes: list[Outcome] = []
        store = keys.KeyStore(self.keys_dir, retired_days=self.settings.dkim_retired_days)
        self.milter = DkimMilter(self.settings, store, self.dns,
                                 self.spf, clock=lambda: 1_700_000_000)
        self.milter.on_outcome = self.outcomes.append

    def add_key(self, domain: str, selector: str, key_type: keys.KeyType = "rsa") -> None:
        result = keys.keygen(self.keys_dir, domain, selector, key_type, 1024 if key_type ==
                             "rsa" else 2048)
        self.dns.records[result.record_name] = [result.record_value]
        self.milter.keys.refresh(force=True)

    def session(self, offer: mc.OptionNegotiation = POSTFIX_OFFER) -> MilterSession:
        session = self.milter.session()
        reply = session.handle(offer)
        assert mc.ReplyDecoder().feed(reply)[0].code == "O"
        return session

    def send(self, message: bytes, client: str = "203.0.113.7", auth: str = "",
             session: MilterSession | None = None, recipients: tuple[str, ...] = ()
             ) -> tuple[list[mc.Reply], bytes]:
        """One message through a session as Postfix sends it; the replies to it. RCPT goes
        to the milter only when it asked for it (ARC sealing on), as Postfix does."""
        session = session or self.session()
        head, _, body = message.partition(b"\r\n\r\n")
        commands: list[mc.Command] = [
            mc.DefineMacros(b"C", {"j": HOST}),
            mc.Connect("client.example", "4", 40000, client),
            mc.Helo("client.example"),
            mc.DefineMacros(b"M", {"auth_authen": auth} if auth else {}),
            mc.MailFrom("<sender@example.org>"),
        ]
        if not self.milter.protocol & mc.NO_RCPT:
            commands += [mc.RcptTo(f"<{r}>") for r in recipients]
        for line in head.replace(b"\r\n ", b"\n ").replace(b"\r\n\t", b"\n\t").split(b"\r\n"):
            name, _, value = line.partition(b":")
            commands.append(mc.Header(name, value))
        commands += [mc.EndOfHeaders(), mc.BodyChunk(body), mc.DefineMacros(b"E", {"i": "QID"})]
        early = b"".join(session.handle(c) for c in commands)
        final = asyncio.run(session.end_of_message(mc.EndOfMessage(b"")))
        session.handle(mc.Abort())
        return mc.ReplyDecoder().feed(early + final), early


def apply(message: bytes, replies: list[mc.Reply]) -> bytes:
    """The message as Postfix delivers it after the milter's header changes."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for reply in replies:
        if reply.code == "m" and reply.value == b"":
            positions = [i for i, line in enumerate(lines)
                         if line.lower().startswith(reply.name.lower() + b":")]
            del lines[positions[reply.index - 1]]
        elif reply.code == "i":
            lines.insert(reply.index, reply.name + b":" + reply.value.replace(b"\n", b"\r\n"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Date: Sat, 28 Nov 2026 00:34:44 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_negotiation_asks_for_fewer_round_trips() -> None:
    agreed = mc.negotiate(POSTFIX_OFFER, 0x1FF, WANTED_PROTOCOL)
    assert agreed.protocol & mc.NO_REPLY_HEADER and agreed.protocol & mc.NO_REPLY_BODY
    assert agreed.header_leading_space


def test_mail_from_mynetworks_is_signed(harness: Harness) -> None:
    harness.add_key("example.org", "s1")
    harness.add_key("example.org", "e1", "ed25519")
    replies, early = harness.send(MESSAGE, client="127.0.0.1")
    assert early == b""  # every step before end of message goes without a reply
    assert [r.code for r in replies] == ["i", "i", "c"]
    assert [r.name for r in replies[:2]] == [b"DKIM-Signature"] * 2
    assert replies[0].value.startswith(b" v=1; a=ed25519-sha256;")  # leading space kept
    assert replies[1].value.startswith(b" v=1; a=rsa-sha256;")
    assert b"\r" not in replies[0].value  # Postfix wants \n line ends from a milter
    signed = apply(MESSAGE, replies)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")  # RSA on top

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        found = harness.dns.records.get(name.decode().rstrip("."))
        return found[0].encode() if found else None

    checker = dkim.DKIM(signed)
    assert checker.verify(0, dnsfunc=dns) and checker.verify(1, dnsfunc=dns)
    assert harness.outcomes[-1].mode == "sign"
    assert harness.outcomes[-1].fields["selectors"] == "s1/rsa,e1/ed25519"


def test_authenticated_sender_is_signed_from_anywhere(harness: Harness) -> None:
    harness.add_key("example.org", "s1")
    replies, _ = harness.send(MESSAGE, client="198.51.100.9", auth="alice")
    assert [r.code for r in replies] == ["i", "c"]


def test_internal_mail_without_key_passes_untouched(harness: Harness) -> None:
    replies, _ = harness.send(MESSAGE, client="127.0.0.1")
    assert [r.code for r in replies] == ["c"]
    assert harness.outcomes[-1].reason == "no key for example.org"


@pytest.mark.parametrize(("fail_open", "codes"), [(False, ["y"]), (True, ["c"])])
def test_unreadable_key_defers_or_passes(tmp_path: Path, fail_open: bool,
                                         codes: list[str]) -> None:
    harness = Harness(tmp_path, dkim_fail_open=fail_open)
    harness.add_key("example.org", "s1")
    (harness.keys_dir / "example.org" / "s1.private").write_text("broken")
    harness.milter.keys.refresh(force=True)
    replies, _ = harness.send(MESSAGE, client="127.0.0.1")
    assert [r.code for r in replies] == codes
    if not fail_open:
        assert replies[0].value.startswith(b"451 4.7.5 DKIM signing temporarily unavailable")
    assert "unusable" in harness.outcomes[-1].reason


def signed_elsewhere(harness: Harness, domain: str = "example.org") -> bytes:
    """MESSAGE signed by another host of `domain` (its key published in the fake DNS)."""
    harness.add_key(domain, "remote")
    replies, _ = harness.send(MESSAGE, client="127.0.0.1")
    (harness.keys_dir / domain / "active").unlink()  # this host does not sign for it
    harness.milter.keys.refresh(force=True)
    return apply(MESSAGE, replies)


def first_header(message: bytes) -> bytes:
    """The first header field with its continuation lines, CRLF included."""
    lines = message.split(b"\r\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\r\n".join(lines[:end]) + b"\r\n"


def authentication_results(replies: list[mc.Reply]) -> str:
    [value] = [r.value for r in replies if r.name == b"Authentication-Results"]
    return value.decode()


def test_inbound_signed_mail_gets_authentication_results(harness: Harness) -> None:
    message = signed_elsewhere(harness)
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    replies, _ = harness.send(message)
    assert [r.code for r in replies] == ["i", "c"] and replies[0].index == 0
    value = authentication_results(replies)
    assert value.startswith(" mx.secumail.test;\n\tdkim=pass (1024-bit rsa key)")
    assert "header.d=example.org header.i=@example.org header.s=remote" in value
    assert "dmarc=pass (p=reject dis=none) header.from=example.org" in value
    assert harness.outcomes[-1].fields["dkim"] == "pass:example.org"


def test_tampered_body_fails_and_dmarc_reject_refuses_it(tmp_path: Path) -> None:
    harness = Harness(tmp_path, dmarc_reject=True)
    message = signed_elsewhere(harness).replace(b"Hello Bob.", b"Hello Eve.")
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    replies, _ = harness.send(message)
    assert [r.code for r in replies] == ["y"]
    assert replies[0].value == b"550 5.7.1 Email rejected per DMARC policy for example.org"
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=quarantine"]
    replies, _ = harness.send(message)
    value = authentication_results(replies)
    assert 'dkim=fail (1024-bit rsa key) reason="body hash did not verify"' in value
    assert "dmarc=fail (p=quarantine dis=quarantine)" in value


def test_without_dmarc_reject_a_failure_is_only_reported(harness: Harness) -> None:
    message = signed_elsewhere(harness).replace(b"Hello Bob.", b"Hello Eve.")
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    replies, _ = harness.send(message)
    assert "dmarc=fail (p=reject dis=reject)" in authentication_results(replies)


def test_every_signature_is_verified(harness: Harness) -> None:
    message = signed_elsewhere(harness)
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x; h=to; bh=AA==; b=AA==\r\n"
    unknown = first_header(message.replace(b"s=remote;", b"s=gone;"))
    replies, _ = harness.send(broken + unknown + message)
    entries = authentication_results(replies).split(";\n\t")[1:]
    assert entries[0].startswith('dkim=permerror reason="From is not signed"')
    assert entries[1].startswith('dkim=permerror reason="no key for signature"')
    assert entries[2].startswith("dkim=pass")
    assert entries[3] == "spf=none smtp.mailfrom=example.org"
    assert entries[4] == "dmarc=none header.from=example.org"


FORGED_SPF = (b"Received-SPF: pass (mx.secumail.test: domain of example.org designates "
              b"203.0.113.7 as permitted sender) client-ip=203.0.113.7; "
              b'envelope-from="sender@example.org"; helo=client.example; '
              b"receiver=mx.secumail.test; identity=mailfrom\r\n")


def test_dmarc_uses_this_hosts_own_spf_result(harness: Harness) -> None:
    harness.spf.results["203.0.113.7"] = "pass"
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    replies, _ = harness.send(MESSAGE)
    assert authentication_results(replies).split(";\n\t")[1:] == [
        "dkim=none", "spf=pass smtp.mailfrom=example.org",
        "dmarc=pass (p=reject dis=none) header.from=example.org"]
    assert harness.spf.queries == [("203.0.113.7", "sender@example.org", "client.example")]


@pytest.mark.parametrize("spf", ["fail", "failing", "disabled"])
def test_a_received_spf_header_is_never_trusted(tmp_path: Path, spf: str) -> None:
    """The client wrote a Received-SPF naming this host: DMARC must not pass on it, whether
    this host's own check fails, cannot be done, or is turned off."""
    harness = Harness(tmp_path, spf_enabled=spf != "disabled")
    harness.spf.results["203.0.113.7"] = "fail"
    harness.spf.failing = spf == "failing"
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    replies, _ = harness.send(FORGED_SPF + MESSAGE)
    value = authentication_results(replies)
    assert "dmarc=fail (p=reject dis=reject)" in value
    expected = {"fail": "spf=fail", "failing": "spf=temperror", "disabled": "dkim=none;\n\tdmarc"}
    assert expected[spf] in value


def test_the_null_sender_is_checked_on_its_helo(harness: Harness) -> None:
    session = harness.session()
    harness.spf.results["203.0.113.7"] = "pass"
    harness.send(MESSAGE, session=session)
    assert harness.spf.queries[-1][1] == "sender@example.org"
    # A bounce: MAIL FROM:<>, so SPF checks the HELO name (RFC 7208 2.4).
    commands: list[mc.Command] = [mc.MailFrom("<>"), mc.Header(b"From", b" a@client.example"),
                                  mc.EndOfHeaders()]
    for command in commands:
        session.handle(command)
    asyncio.run(session.end_of_message(mc.EndOfMessage(b"")))
    assert harness.spf.queries[-1] == ("203.0.113.7", "", "client.example")
    assert harness.outcomes[-1].fields["spf"] == "pass"


@pytest.mark.parametrize(
    "froms",
    [b"From: a@bank.example\r\nFrom: b@example.org\r\n",
     b"From: a@example.org\r\nFrom: b@example.org\r\n",
     b"From: a@example.org, b@bank.example\r\n",
     b"From: undisclosed:;\r\n",
     b""],
    ids=["two-domains", "same-domain", "two-domains-one-field", "no-address", "no-from"],
)
def test_a_message_without_exactly_one_author_domain_is_refused(
    harness: Harness, froms: bytes
) -> None:
    message = froms + MESSAGE.replace(b"From: Alice <alice@example.org>\r\n", b"")
    replies, _ = harness.send(message)
    assert [r.code for r in replies] == ["y"]
    assert replies[0].value.startswith(b"550 5.7.1 Message refused: ")
    assert harness.outcomes[-1].action == "reject"


def test_a_huge_header_block_is_refused(harness: Harness) -> None:
    padded = b"X-Pad: 1\r\n" * 2100 + b"Authentication-Results: mx.secumail.test; dmarc=pass\r\n"
    replies, _ = harness.send(padded + MESSAGE)
    assert [r.code for r in replies] == ["y"]
    assert replies[0].value.startswith(b"552 5.6.0 Message header block too large")
    # The same from a trusted client: refused too, never signed or passed as it is.
    replies, _ = harness.send(padded + MESSAGE, client="127.0.0.1")
    assert [r.code for r in replies] == ["y"]


def test_forged_results_are_removed_from_internal_mail_too(harness: Harness) -> None:
    forged = b"Authentication-Results: mx.secumail.test; dkim=pass header.d=bank.example\r\n"
    replies, _ = harness.send(forged + MESSAGE, client="127.0.0.1")  # no key: not signed
    assert [(r.code, r.index) for r in replies] == [("m", 1), ("c", 0)]


def test_forged_authentication_results_are_removed(harness: Harness) -> None:
    forged = (b"Authentication-Results: other.example; dkim=pass\r\n"
              b"Authentication-Results: mx.secumail.test; dkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: MX.SECUMAIL.TEST (really); dmarc=pass\r\n")
    replies, _ = harness.send(forged + MESSAGE)
    assert [(r.code, r.index) for r in replies] == [("m", 3), ("m", 2), ("i", 0), ("c", 0)]
    delivered = apply(forged + MESSAGE, replies)
    assert delivered.count(b"Authentication-Results:") == 2
    assert b"Authentication-Results: other.example; dkim=pass" in delivered
    assert b"bank.example" not in delivered


@pytest.mark.parametrize(("fail_open", "codes"), [(False, ["y"]), (True, ["i", "c"])])
def test_dns_timeout_defers_or_reports_temperror(tmp_path: Path, fail_open: bool,
                                                 codes: list[str]) -> None:
    harness = Harness(tmp_path, dkim_fail_open=fail_open)
    message = signed_elsewhere(harness)
    harness.dns.failing.add("remote._domainkey.example.org")
    replies, _ = harness.send(message)
    assert [r.code for r in replies] == codes
    if fail_open:
        assert "dkim=temperror" in authentication_results(replies)
    else:
        assert replies[0].value.startswith(b"451 4.7.5 DKIM temporarily unavailable")
    assert "DNS temporary failure" in harness.outcomes[-1].reason


def test_dns_timeout_does_not_matter_once_dmarc_passes(harness: Harness) -> None:
    message = signed_elsewhere(harness)
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=none"]
    extra = first_header(message.replace(b"d=example.org", b"d=slow.example"))
    harness.dns.failing.add("remote._domainkey.slow.example")
    replies, _ = harness.send(extra + message)
    assert [r.code for r in replies] == ["i", "c"]
    assert "dkim=temperror" in authentication_results(replies)


def test_several_messages_on_one_connection(harness: Harness) -> None:
    harness.add_key("example.org", "s1")
    session = harness.session()
    for client, code in (("127.0.0.1", "i"), ("203.0.113.7", "i"), ("127.0.0.1", "i")):
        replies, _ = harness.send(MESSAGE, client=client, session=session)
        assert replies[0].code == code
    assert [o.mode for o in harness.outcomes] == ["sign", "verify", "sign"]


def test_peer_without_no_reply_options_gets_a_reply_per_step(harness: Harness) -> None:
    """A minimal MTA (no SMFIP_NR_*, no leading space): every step is answered."""
    harness.add_key("example.org", "s1")
    session = harness.session(mc.OptionNegotiation(2, 0x3F, 0))
    replies, early = harness.send(MESSAGE, client="127.0.0.1", session=session)
    # connect, helo, mail, headers, end of headers, body
    assert early.count(mc.CONTINUE) == 1 + 1 + 1 + 5 + 1 + 1
    signature_reply = next(r for r in replies if r.code == "i")
    assert signature_reply.value.startswith(b"v=1;")  # no leading space: the MTA adds it


def test_commands_before_negotiation_are_a_protocol_error(harness: Harness) -> None:
    with pytest.raises(mc.MilterProtocolError):
        harness.milter.session().handle(mc.Header(b"From", b" a@b"))


def test_abort_mid_message_forgets_it(harness: Harness) -> None:
    harness.add_key("example.org", "s1")
    session = harness.session()
    session.handle(mc.Connect("client.example", "4", 40000, "127.0.0.1"))
    session.handle(mc.MailFrom("<a@example.org>"))
    session.handle(mc.Header(b"From", b" Mallory <m@example.org>"))
    session.handle(mc.Header(b"X-Half", b" sent"))
    assert session.in_message
    session.handle(mc.Abort())  # the client gave up (RSET, or the connection dropped)
    assert not session.in_message and session.headers == []
    replies, _ = harness.send(MESSAGE, client="127.0.0.1", session=session)
    signature_value = next(r.value for r in replies if r.code == "i")
    assert b"x-half" not in signature_value.lower()
    assert harness.outcomes[-1].mode == "sign"


def test_quit_new_connection_forgets_the_client(harness: Harness) -> None:
    session = harness.session()
    session.handle(mc.Connect("client.example", "4", 40000, "127.0.0.1"))
    session.handle(mc.DefineMacros(b"C", {"j": HOST}))
    session.handle(mc.QuitNewConnection())
    assert session.client_ip is None and session.connection_macros == {}


def test_sender_text_quoted_in_results_cannot_start_a_header(harness: Harness) -> None:
    """Signature fields and errors are the sender's text: a CR or LF in them must not end
    the Authentication-Results header and start one of the sender's choosing."""
    broken = (b"DKIM-Signature: v=1; a=rsa\rBcc: victim@example.net; d=example.org; s=x;"
              b" h=from; bh=AA==; b=AA==\r\n")
    replies, _ = harness.send(broken + MESSAGE)
    value = authentication_results(replies)
    assert "dkim=permerror" in value
    assert "\r" not in value and "\nBcc" not in value


# --- issue 30: our own domain in the From of mail from outside (CEO fraud) ----------------------

CEO = MESSAGE.replace(b"Alice <alice@example.org>", b"CEO <ceo@secumail.test>")


def reply_text(replies: list[mc.Reply]) -> str:
    [refusal] = [r for r in replies if r.code == "y"]
    return refusal.data.rstrip(b"\0").decode()


@pytest.mark.parametrize("dmarc_record", [None, "v=DMARC1; p=none", "v=DMARC1; p=reject"])
def test_our_domain_from_outside_is_refused_whatever_its_dmarc_record(
    harness: Harness, dmarc_record: str | None
) -> None:
    """It was delivered as if the CEO wrote it (p=reject too: SECUMAIL_DMARC_REJECT is off)."""
    if dmarc_record:
        harness.dns.records["_dmarc.secumail.test"] = [dmarc_record]
    for message in (CEO, CEO.replace(b"ceo@secumail.test", b"ceo@hr.Secumail.test")):
        replies, _ = harness.send(message)
        assert reply_text(replies).startswith("550 5.7.1 Message refused: From ")
        assert "your own domain from outside, not signed with its key" in reply_text(replies)
    assert harness.outcomes[-1].action == "reject"


def test_our_own_signed_mail_coming_back_passes(harness: Harness) -> None:
    harness.add_key("secumail.test", "s1")
    replies, _ = harness.send(CEO, client="127.0.0.1")  # signed on its way out
    signed = apply(CEO, replies)
    replies, _ = harness.send(signed)  # back from a forwarder
    assert "dkim=pass" in authentication_results(replies)
    assert [r.code for r in replies] == ["i", "c"]


def test_a_signature_of_another_domain_or_key_does_not_make_it_ours(harness: Harness) -> None:
    other = signed_elsewhere(harness, "evil.test")  # From example.org, signed d=evil.test
    forged = other.replace(b"alice@example.org", b"ceo@secumail.test")
    replies, _ = harness.send(forged)
    assert "your own domain from outside" in reply_text(replies)
    # Our domain's name, a key that is not one of ours (published by someone, not active here).
    harness.add_key("secumail.test", "old")
    replies, _ = harness.send(CEO, client="127.0.0.1")
    signed = apply(CEO, replies)
    (harness.keys_dir / "secumail.test" / "active").unlink()
    harness.milter.keys.refresh(force=True)
    replies, _ = harness.send(signed)
    assert "your own domain from outside" in reply_text(replies)


@pytest.mark.parametrize(("retired_days", "passes"), [(7.0, True), (0.0, False)])
def test_our_mail_signed_with_a_key_just_retired_still_comes_back(
        tmp_path: Path, retired_days: float, passes: bool) -> None:
    """Mail signed before a key rotation, brought back by a forwarder after it, is ours for
    SECUMAIL_DKIM_RETIRED_DAYS (its record stays published that long); it was refused as a
    forgery the moment the new key signed."""
    harness = Harness(tmp_path, dkim_retired_days=retired_days)
    harness.add_key("secumail.test", "s1")
    replies, _ = harness.send(CEO, client="127.0.0.1")
    signed = apply(CEO, replies)
    old_key = harness.keys_dir / "secumail.test" / f"s1{keys.KEY_SUFFIX}"
    os.utime(old_key, (time.time() - 86400, time.time() - 86400))  # made a day ago
    harness.add_key("secumail.test", "s2")
    keys.activate(harness.keys_dir, "secumail.test", "s2")
    harness.milter.keys.refresh(force=True)
    replies, _ = harness.send(signed)
    if passes:
        assert [r.code for r in replies] == ["i", "c"]
        assert "dkim=pass" in authentication_results(replies)
    else:
        assert "your own domain from outside" in reply_text(replies)


def test_mynetworks_authenticated_allowed_or_accepting_sites_are_not_refused(
    tmp_path: Path
) -> None:
    harness = Harness(tmp_path / "a")
    assert [r.code for r in harness.send(CEO, client="127.0.0.1")[0]] == ["c"]  # no key
    assert [r.code for r in harness.send(CEO, auth="alice")[0]] == ["c"]
    allowed = Harness(tmp_path / "b", own_domain_allowed_networks="203.0.113.0/24")
    assert [r.code for r in allowed.send(CEO)[0]] == ["i", "c"]
    assert [r.code for r in allowed.send(CEO, client="198.51.100.1")[0]] == ["y"]
    accepting = Harness(tmp_path / "c", own_domain_from_outside="accept")
    assert [r.code for r in accepting.send(CEO)[0]] == ["i", "c"]


def test_a_display_name_showing_our_address_is_tagged(harness: Harness) -> None:
    forged_tag = b"X-SecuMail-Warning: nothing to see\r\n"
    message = forged_tag + MESSAGE.replace(
        b"Alice <alice@example.org>", b'"ceo@secumail.test" <x@example.org>')
    replies, _ = harness.send(message)
    delivered = apply(message, replies)
    assert delivered.count(b"X-SecuMail-Warning:") == 1
    assert (b"X-SecuMail-Warning: the sender's name shows ceo@secumail.test, an address of "
            b"this site, but the mail comes from example.org outside it") in delivered
    replies, _ = harness.send(forged_tag + MESSAGE)  # a plain name: no warning, the forged gone
    assert b"X-SecuMail-Warning" not in apply(forged_tag + MESSAGE, replies)


def test_forged_results_next_to_unicode_blanks_are_removed(harness: Harness) -> None:
    """Issue 30: a no-break or ideographic space next to our authserv-id (a mail client shows
    a space) made a forged header read as another host's, and it was kept."""
    forged = ("Authentication-Results: other.example\u00a0; dkim=pass\r\n"
              "Authentication-Results:\u00a0mx.secumail.test; dkim=pass header.d=bank.example\r\n"
              "Authentication-Results: mx.secumail.test\u3000; dmarc=pass header.from=bank.example"
              "\r\n"
              'Authentication-Results: \u200b"mx.secumail\\.test"\ufeff 1; spf=pass '
              "smtp.mailfrom=bank.example\r\n").encode()
    replies, _ = harness.send(forged + MESSAGE)
    assert [(r.code, r.index) for r in replies] == [("m", 4), ("m", 3), ("m", 2), ("i", 0),
                                                    ("c", 0)]
    delivered = apply(forged + MESSAGE, replies)
    assert delivered.count(b"Authentication-Results:") == 2
    assert "Authentication-Results: other.example\u00a0; dkim=pass".encode() in delivered
    assert b"bank.example" not in delivered


def test_a_second_subject_beside_a_signed_one_is_no_pass(harness: Harness) -> None:
    """Issue 33: a signer that signs Subject once (dkimpy's default), and a second Subject
    added above it after signing: the signature still verifies over the one it covers, but a
    mail client may show the other. dkim=policy, so no DMARC pass rests on it."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    harness.dns.records["d1._domainkey.example.org"] = [
        f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"]
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    signed = dkim.sign(MESSAGE, b"d1", b"example.org", pem,
                       include_headers=[b"from", b"to", b"subject", b"date"]) + MESSAGE
    replies, _ = harness.send(signed)
    assert "dkim=pass" in authentication_results(replies)
    for added in (b"Subject: your account is closed\r\n", b"To: everyone@example.net\r\n",
                  b"Date: Mon, 1 Jan 2035 00:00:00 +0000\r\n"):
        replies, _ = harness.send(added + signed)
        value = authentication_results(replies)
        name = added.split(b":")[0].decode()
        assert f'dkim=policy (1024-bit rsa key) reason="2 {name} fields, the signature covers 1"' \
            in value, value
        assert "dmarc=fail" in value
