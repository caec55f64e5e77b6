"""ARC (RFC 8617) in the DKIM milter, without sockets: chains sealed by dkimpy (a second
implementation, with authres), verified by the milter as Postfix feeds it, and dkimpy's own
verdict on the same chains; the structure rules of RFC 8617 5.2; the DMARC override for
trusted sealers, and a forged chain that claims one."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.dkim import arc
from tests.unit.test_dkim_milter import (
    MESSAGE,
    Harness,
    apply,
    authentication_results,
    signed_elsewhere,
)

LIST = "lists.example"
LIST_IP = "198.51.100.20"


def rsa_key(bits: int = 1024) -> tuple[bytes, str]:
    """A private key (PEM) and its DKIM key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


class Sealer:
    """A forwarder that seals with dkimpy: its key in the fake DNS (or another's)."""

    def __init__(self, harness: Harness, domain: str, bits: int = 1024,
                 publish: bool = True) -> None:
        self.domain = domain
        self.pem, record = rsa_key(bits)
        if publish:
            harness.dns.records[f"arc._domainkey.{domain}"] = [record]

    def seal(self, message: bytes, results: str) -> bytes:
        """The message with this hop's results and its ARC set on top, as dkimpy makes them."""
        stamped = f"Authentication-Results: {self.domain}; {results}\r\n".encode() + message
        fields = dkim.arc_sign(stamped, b"arc", self.domain.encode(), self.pem,
                               self.domain.encode(), timestamp=1_700_000_000)
        return b"".join(fields) + stamped


def forwarded(message: bytes) -> bytes:
    """What a mailing list does to a message: a tag in the Subject, a footer (DKIM breaks)."""
    return message.replace(b"Subject: hello", b"Subject: [list] hello") + b"-- \r\nthe list\r\n"


def dnsfunc(harness: Harness):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        records = harness.dns.records.get(name.decode().rstrip("."))
        return records[0].encode() if records else None
    return lookup


def dkimpy_verdict(harness: Harness, message: bytes) -> bytes:
    cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc(harness))
    return cv  # type: ignore[no-any-return]


def arc_entry(replies: list) -> str:  # type: ignore[type-arg]
    found = re.search(r"arc=[^;]*", authentication_results(replies))
    return found[0] if found else ""


@pytest.fixture
def list_mail(tmp_path: Path) -> tuple[Harness, bytes]:
    """Alice's mail signed by example.org (p=reject), through the list, sealed by it."""
    harness = Harness(tmp_path, dmarc_reject=True, arc_trusted_sealers=[LIST])
    original = signed_elsewhere(harness)
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    sealed = Sealer(harness, LIST).seal(
        forwarded(original), "dkim=pass header.d=example.org; spf=pass "
        "smtp.mailfrom=example.org; dmarc=pass header.from=example.org")
    return harness, sealed


def test_a_list_sealed_by_dkimpy_passes_here_and_a_trusted_sealer_overrides_dmarc(
    list_mail: tuple[Harness, bytes],
) -> None:
    harness, sealed = list_mail
    assert dkimpy_verdict(harness, sealed) == b"pass"
    replies, _ = harness.send(sealed, client=LIST_IP)
    assert [r.code for r in replies][-1] == "c", replies  # delivered, not 550
    value = authentication_results(replies)
    assert "dkim=fail" in value  # the footer broke Alice's signature
    assert arc_entry(replies) == (f"arc=pass (1 set) smtp.remote-ip={LIST_IP} "
                                  "header.oldest-pass=0")
    assert ("dmarc=fail (p=reject dis=none; arc=pass, dmarc=pass at trusted sealer "
            "lists.example) policy.override=arc header.from=example.org") in value
    assert harness.outcomes[-1].fields["dmarc_override"] == "arc:lists.example"


def test_the_same_chain_from_an_untrusted_sealer_changes_nothing(tmp_path: Path) -> None:
    harness = Harness(tmp_path, dmarc_reject=True)  # no trusted sealers
    original = signed_elsewhere(harness)
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    sealed = Sealer(harness, LIST).seal(forwarded(original), "dmarc=pass")
    replies, _ = harness.send(sealed, client=LIST_IP)
    assert [r.code for r in replies] == ["y"]
    assert replies[0].value == b"550 5.7.1 Email rejected per DMARC policy for example.org"


def test_a_forged_chain_claiming_a_trusted_sealer_is_refused(tmp_path: Path) -> None:
    """The attack: a spammer seals a forged "dmarc=pass" with a key of their own under the
    trusted sealer's name (d=lists.example); the DNS has the list's real key."""
    harness = Harness(tmp_path, dmarc_reject=True, arc_trusted_sealers=[LIST])
    Sealer(harness, LIST)  # the list's real key, published
    forger = Sealer(harness, LIST, publish=False)
    harness.dns.records["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    forged = forger.seal(forwarded(MESSAGE), "dmarc=pass header.from=example.org")
    assert dkimpy_verdict(harness, forged) == b"fail"
    replies, _ = harness.send(forged, client="203.0.113.66")
    assert [r.code for r in replies] == ["y"], replies
    assert replies[0].value == b"550 5.7.1 Email rejected per DMARC policy for example.org"
    assert harness.outcomes[-1].fields["arc"] == "fail"


def test_a_trusted_sealer_after_an_untrusted_one_vouches_for_nothing_it_did_not_see(
    list_mail: tuple[Harness, bytes],
) -> None:
    """dmarc=pass claimed by an untrusted hop, resealed by the trusted list (which found no
    DMARC pass itself): no override."""
    harness, _ = list_mail
    relay = Sealer(harness, "relay.example")
    first = relay.seal(forwarded(MESSAGE), "dmarc=pass header.from=example.org")
    second = Sealer(harness, LIST).seal(first, "arc=pass; dmarc=fail header.from=example.org")
    assert dkimpy_verdict(harness, second) == b"pass"
    replies, _ = harness.send(second, client=LIST_IP)
    assert [r.code for r in replies] == ["y"]


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("bits", [1024, 2048])
def test_chains_of_several_hops_agree_with_dkimpy(tmp_path: Path, hops: int, bits: int) -> None:
    harness = Harness(tmp_path)
    message = forwarded(MESSAGE)
    for hop in range(hops):
        results = "arc=pass" if hop else "dkim=none"
        message = Sealer(harness, f"hop{hop}.example", bits).seal(message, results)
    assert dkimpy_verdict(harness, message) == b"pass"
    replies, _ = harness.send(message)
    assert arc_entry(replies).startswith(f"arc=pass ({hops} set")
    # A sealed field changed afterwards: both implementations fail it.
    tampered = message.replace(b"Subject: [list] hello", b"Subject: [list] hell0")
    assert dkimpy_verdict(harness, tampered) == b"fail"
    replies, _ = harness.send(tampered)
    assert arc_entry(replies).startswith("arc=fail")


def test_relaxed_canonicalisation_of_the_arc_fields(list_mail: tuple[Harness, bytes]) -> None:
    """Folding, the fields' names' case, and white space around `:` `;` `=` do not matter
    to the seal (relaxed); a changed tag value does."""
    harness, sealed = list_mail
    refolded = sealed.replace(b"ARC-Seal: ", b"arc-seal :  ").replace(b"; d=", b";\r\n\td=", 1)
    replies, _ = harness.send(refolded, client=LIST_IP)
    assert arc_entry(replies).startswith("arc=pass"), arc_entry(replies)
    seal_end = sealed.index(b"ARC-Message-Signature")
    altered = sealed[:seal_end].replace(b"t=1700000000", b"t=1700000001") + sealed[seal_end:]
    assert altered != sealed
    replies, _ = harness.send(altered, client=LIST_IP)
    assert [r.code for r in replies] == ["y"]  # no override: DMARC's reject
    assert harness.outcomes[-1].fields["arc"] == "fail"


def arc_set(instance: int, cv: str = "none", ams: str = "") -> list[tuple[bytes, bytes]]:
    """Syntactically complete fields of one set (nothing verifies; the structure is tested)."""
    ams = ams or (f" i={instance}; a=rsa-sha256; d=x.example; s=s; h=from; bh=AA==; b=AA==")
    return [(b"ARC-Authentication-Results", f" i={instance}; x.example; dmarc=pass".encode()),
            (b"ARC-Message-Signature", ams.encode()),
            (b"ARC-Seal", f" i={instance}; a=rsa-sha256; cv={cv}; d=x.example; s=s; b=AA=="
                          .encode())]


def chain_of(*sets: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [field for fields in reversed(sets) for field in fields]


@pytest.mark.parametrize(("headers", "why"), [
    (chain_of(arc_set(1), arc_set(3, "pass")), "ARC set i=2 is missing"),
    (chain_of(arc_set(1), arc_set(1)), "two ARC-Authentication-Results fields with i=1"),
    (chain_of(arc_set(1), arc_set(2, "pass")[:2]), "ARC set i=2 is missing or incomplete"),
    (chain_of(arc_set(1), arc_set(2, "fail")), "says the chain had failed (cv=fail)"),
    (chain_of(arc_set(1, "pass")), "ARC-Seal i=1 says cv=pass, not none"),
    (chain_of(arc_set(1), arc_set(2, "none")), "ARC-Seal i=2 says cv=none, not pass"),
    (chain_of(*(arc_set(i, "none" if i == 1 else "pass") for i in range(1, 52))),
     "more than 50 ARC sets"),
    (chain_of(arc_set(1), arc_set(51, "pass")), "i=51: more than 50 ARC sets"),
    ([(b"ARC-Seal", b" a=rsa-sha256; cv=none; d=x.example; s=s; b=AA==")],
     "ARC-Seal without a valid instance"),
    (chain_of(arc_set(1, ams=" i=1; a=rsa-sha256; d=x.example; s=s; h=from:arc-seal; bh=AA==;"
                              " b=AA==")), "may not sign ARC-Seal"),
    (chain_of(arc_set(1, ams=" i=1; a=rsa-sha256; d=x.example; s=s; h=subject; bh=AA==; "
                              "b=AA==")), "From is not signed"),
])
def test_structures_that_fail_before_any_key_is_asked(headers: list[tuple[bytes, bytes]],
                                                       why: str) -> None:
    with pytest.raises(arc.ChainError, match=re.escape(why)):
        arc.collect(headers)


def test_fifty_sets_are_a_chain_and_unknown_tags_are_ignored() -> None:
    sets = [arc_set(i, "none" if i == 1 else "pass") for i in range(1, 51)]
    sets[0][2] = (b"ARC-Seal", b" i=1; a=rsa-sha256; cv=none; d=x.example; s=s; zz=new; b=AA==")
    chain = arc.collect(chain_of(*sets))
    assert chain is not None and len(chain.sets) == 50 and chain.sealers == ["x.example"] * 50
    assert arc.collect([(b"Subject", b" no chain")]) is None


def test_a_broken_structure_is_arc_fail_in_the_results(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    head = b"".join(name + b":" + value + b"\r\n"
                    for name, value in chain_of(arc_set(1), arc_set(2, "fail")))
    replies, _ = harness.send(head + MESSAGE)
    assert arc_entry(replies) == ('arc=fail reason="ARC-Seal i=2 says the chain had failed '
                                  '(cv=fail)" smtp.remote-ip=203.0.113.7')


# --- sealing (issue 33, item 1) -----------------------------------------------------------------

def forwarding_host(tmp_path: Path) -> Harness:
    """This host forwards fwd.secumail.test's mail elsewhere and seals it with that domain's
    key (published in the fake DNS)."""
    harness = Harness(tmp_path / "fwd", arc_seal_domains="fwd.secumail.test",
                      domains=["secumail.test", "fwd.secumail.test"])
    harness.add_key("fwd.secumail.test", "seal")
    return harness


def sealed_here(harness: Harness, message: bytes, to: str = "alias@fwd.secumail.test"
                ) -> tuple[bytes, list]:  # type: ignore[type-arg]
    replies, _ = harness.send(message, recipients=(to,))
    assert [r.code for r in replies][-1] == "c"
    return apply(message, replies), replies


def test_mail_we_forward_is_sealed_and_verifies_with_dkimpy_and_here(tmp_path: Path) -> None:
    harness = forwarding_host(tmp_path)
    message = signed_elsewhere(harness)  # signed by example.org, from outside
    sealed, _ = sealed_here(harness, message)
    assert MESSAGE.split(b"\r\n\r\n")[1] in sealed
    assert sealed.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.secumail.test;")
    assert b"ARC-Authentication-Results: i=1; mx.secumail.test;" in sealed
    assert dkimpy_verdict(harness, sealed) == b"pass"
    # The next hop, another host running the milter, verifies our chain as a whole.
    next_hop = Harness(tmp_path / "next", authserv_id="mx.next.test")
    next_hop.dns.records.update(harness.dns.records)
    replies, _ = next_hop.send(sealed)
    assert arc_entry(replies).startswith("arc=pass")


def test_a_chain_that_passed_gets_the_next_set_and_a_failed_one_none(tmp_path: Path) -> None:
    harness = forwarding_host(tmp_path)
    listed = Sealer(harness, LIST).seal(forwarded(signed_elsewhere(harness)),
                                        "dkim=pass header.d=example.org")
    sealed, replies = sealed_here(harness, listed)
    assert sealed.startswith(b"ARC-Seal: i=2; a=rsa-sha256; cv=pass; d=fwd.secumail.test;")
    assert dkimpy_verdict(harness, sealed) == b"pass"
    # A broken chain: no set of ours vouches for it (RFC 8617 5.1.2).
    tampered = listed.replace(b"the list", b"the lost")
    sealed, replies = sealed_here(harness, tampered)
    assert b"ARC-Seal: i=2" not in sealed and arc_entry(replies).startswith("arc=fail")


def test_only_mail_from_outside_to_a_forwarding_domain_is_sealed(tmp_path: Path) -> None:
    harness = forwarding_host(tmp_path)
    message = signed_elsewhere(harness)
    for to in ("bob@secumail.test", "someone@elsewhere.test"):
        sealed, _ = sealed_here(harness, message, to)
        assert b"ARC-Seal" not in sealed
    # Without the setting, Postfix is not even asked for the recipients.
    assert Harness(tmp_path / "plain").milter.protocol & 0x08  # NO_RCPT
    assert not forwarding_host(tmp_path / "x").milter.protocol & 0x08


def test_no_fifty_first_set_is_sealed(tmp_path: Path) -> None:
    harness = forwarding_host(tmp_path)
    found = harness.milter.keys.lookup("fwd.secumail.test")
    assert found is not None
    key = found.keys[0]
    fifty = arc.collect(chain_of(*(arc_set(i, "none" if i == 1 else "pass")
                                   for i in range(1, 51))))
    forty_nine = arc.collect(chain_of(*(arc_set(i, "none" if i == 1 else "pass")
                                        for i in range(1, 50))))
    headers = [(b"From", b" a@example.org\r\n")]
    assert arc.new_set(fifty, "pass", b"x; arc=pass", headers, b"\0" * 32, key, 1) is None
    made = arc.new_set(forty_nine, "pass", b"x; arc=pass", headers, b"\0" * 32, key, 1)
    assert made is not None and made[2][1].startswith(b" i=50; a=rsa-sha256; cv=pass;")
