"""Test messages: plain, EICAR, GTUBE, and attachments from Debian's clamav-testfiles."""

from __future__ import annotations

import base64
import bz2
import functools
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from testkit.scanners import EICAR, GTUBE, TESTFILES


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


def attaching(files: list[tuple[str, bytes]], subject: str = "attachments") -> bytes:
    """A message with a text part and each (filename, content) attached."""
    message = EmailMessage()
    message["From"] = "alice@secumail.test"
    message["To"] = "bob@secumail.test"
    message["Subject"] = subject
    message.set_content("See the attachments.\n")
    for name, content in files:
        message.add_attachment(content, maintype="application", subtype="octet-stream",
                               filename=name)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


# Samples the attachment rules must catch, built here (Debian's clamav-testfiles has no
# such names): a Windows program's first bytes, and archives made with libarchive.
PROGRAM = b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 120 + b"PE\x00\x00"


def zipped(files: list[tuple[str, bytes]], archive_format: str = "zip",
           options: str = "", passphrase: str | None = None,
           filter_name: str | None = None) -> bytes:
    """An archive (zip, 7zip, ustar, v7tar, cpio_newc...) holding the files, made by
    libarchive, compressed by `filter_name` (zstd, gzip...) if given."""
    import libarchive

    chunks: list[bytes] = []

    def write(data: bytes) -> int:
        chunks.append(bytes(data))
        return len(data)

    with libarchive.custom_writer(write, archive_format, filter_name=filter_name,
                                  options=options, passphrase=passphrase) as archive:
        for name, content in files:
            archive.add_file_from_memory(name, len(content), content)
    return b"".join(chunks)


def rar4(name: str, content: bytes, encrypted: bool = False) -> bytes:
    """A RAR 4 archive with one stored file (RAR cannot be written by free tools): marker,
    archive header, file header, the data, end of archive; each header with its CRC."""
    import struct
    import zlib

    def block(head_type: int, flags: int, body: bytes) -> bytes:
        rest = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
        return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest

    encoded = name.encode()
    flags = 0x8000 | (0x04 if encrypted else 0)  # LONG_BLOCK, and PASSWORD
    header = struct.pack("<IIBIIBBHI", len(content), len(content), 2, zlib.crc32(content),
                         0x5A000000, 20, 0x30, len(encoded), 0x20) + encoded
    return (b"Rar!\x1a\x07\x00" + block(0x73, 0, b"\x00" * 6) + block(0x74, flags, header)
            + content + bytes.fromhex("c43d7b00400700"))


@functools.cache
def bzip2_bomb(size: int = 200 * 2**20) -> bytes:
    """A few hundred bytes of bzip2 that expand to `size` bytes starting with ARJ's magic
    (issue 30: the filter read such a stream whole, never charging its bytes)."""
    return bz2.compress(b"\x60\xea" + bytes(size), 9)


def with_part(headers: str, body: bytes) -> bytes:
    """A message with a text part, then one part with exactly these header lines (CRLF
    added) and this body (encoded in base64 unless the headers say otherwise)."""
    if "content-transfer-encoding" not in headers.lower():
        headers += "\nContent-Transfer-Encoding: base64"
        body = base64.encodebytes(body)
    part = headers.replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n" + \
        body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (b"From: alice@secumail.test\r\nTo: bob@secumail.test\r\nSubject: a part\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
            b"--XX\r\n" + part + b"\r\n--XX--\r\n")
