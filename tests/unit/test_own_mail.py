"""The gateway's own mail (gateway/own_mail.py): signed by the milter before queue (marked as
a local submission), signed by the gateway itself after queue, where 10027 runs no milter."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import dkim

from gateway.own_mail import prepared
from secumail.dkim_keys import KeyStore, keygen
from secumail.forwarded import HEADER
from secumail.settings import Settings


def notice(sender: str = "postmaster@secumail.test") -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = f"SecuMail <{sender}>", "bob@secumail.test", "x"
    mail.set_content("Your digest.\n")
    return mail.as_bytes()


def test_after_queue_the_gateway_signs_its_own_mail(tmp_path: Path) -> None:
    made = keygen(tmp_path, "secumail.test", "s1", "rsa", 1024, True)
    settings = Settings(filter_mode="after-queue", dkim_keys_dir=str(tmp_path))
    out = prepared(settings, notice(), KeyStore(tmp_path))

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return made.record_value.encode() if name.rstrip(b".") == \
            made.record_name.encode() else None

    assert out.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and b"\r\n" in out
    assert dkim.verify(out, dnsfunc=dns)
    assert HEADER.encode() not in out
    # A From domain without a key: sent as it is (and said in the log).
    assert prepared(settings, notice("x@elsewhere.test"), KeyStore(tmp_path)) == \
        notice("x@elsewhere.test")


def test_before_queue_the_milter_signs_it_as_a_local_submission() -> None:
    out = prepared(Settings(filter_mode="before-queue"), notice())
    assert out.startswith(f"{HEADER}: addr=127.0.0.1; helo=".encode())
    assert b"DKIM-Signature" not in out
