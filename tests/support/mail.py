"""Test messages: plain, EICAR, GTUBE, and attachments from Debian's clamav-testfiles."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from tests.support.scanners import EICAR, GTUBE, TESTFILES


def plain(
    subject: str = "hello",
    body: str = "Hi Bob, lunch tomorrow?\n",
    sender: str = "alice@secumail.test",
    to: str = "bob@secumail.test",
) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="secumail.test")
    message["Date"] = formatdate(localtime=False)
    message.set_content(body)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def eicar() -> bytes:
    return plain("eicar", "The test virus:\n" + EICAR.decode() + "\n")


def gtube(body_padding: int = 0) -> bytes:
    padding = ("padding " * (body_padding // 8 + 1) + "\n") if body_padding else ""
    return plain("gtube", "Spam test:\n" + GTUBE.decode() + "\n" + padding)


def with_attachment(filename: str) -> bytes:
    message = EmailMessage()
    message["From"] = "alice@secumail.test"
    message["To"] = "bob@secumail.test"
    message["Subject"] = f"attached {filename}"
    message.set_content("See the attachment.\n")
    message.add_attachment(
        (TESTFILES / filename).read_bytes(),
        maintype="application",
        subtype="octet-stream",
        filename=filename,
    )
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
