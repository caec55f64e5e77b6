"""A MIME walk over a raw message: where each leaf part lies, its headers, its decoded body.

The message stays one bytes object: a part is a pair of offsets into it, so that a filter
can read a part, or put another in its place, without re-serialising the message (what
the `email` package would do, altering what DKIM signed). Walked with an explicit stack
and limits, never recursion, so that hostile nesting costs a bounded amount of time; the
`email` package only parses each part's header block (RFC 2231 and RFC 2047 filenames).
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from functools import cached_property
from typing import Any

_UNSET = object()


class PartHeaders(EmailMessage):
    """A part's header block, as the email package reads it, each field parsed at most once.

    Every get() of a field makes the email package parse it into a header object again
    (get_content_type, get_param and get_filename each get() Content-Type or
    Content-Disposition): 3 or 4 parses a part, most of a filter's attachment check. The
    same parser with the same policy, its first answer kept: what is read does not change."""

    def get(self, name: str, failobj: Any = None) -> Any:
        parsed: dict[str, Any] = self.__dict__.setdefault("_parsed", {})
        key = name.lower()
        value = parsed.get(key, _UNSET)
        if value is _UNSET:
            value = parsed[key] = super().get(name, _UNSET)
        return failobj if value is _UNSET else value

    def __setitem__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_parsed", None)
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        self.__dict__.pop("_parsed", None)
        super().__delitem__(name)


_HEADERS = BytesHeaderParser(_class=PartHeaders, policy=policy.default)
# Every byte but base64's alphabet: line breaks, padding, junk (bytes.translate drops them
# ten times faster than a regular expression).
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")))
MAX_BOUNDARY = 200  # RFC 2046 allows 70; a longer one is not worth a regular expression


class MimeTooComplex(Exception):
    """More parts or deeper nesting than the limits: too costly to check, so not trusted."""


@dataclass(frozen=True)
class Part:
    """A leaf part: `message[start:end]` is the whole part (its headers, then its body from
    `body_start`); the CRLF before the next boundary is not the part's."""

    start: int
    body_start: int
    end: int
    depth: int  # 0: the message itself
    headers: EmailMessage
    content_type: str  # as the email package reads it (text/plain when it cannot)

    # Each read of a field parses it again in the email package: read once, kept.
    @cached_property
    def filename(self) -> str:
        """The name the sender gave (Content-Disposition's filename, else Content-Type's
        name), decoded, without any folder part; "" if none."""
        try:
            name = self.headers.get_filename() or ""
        except Exception:  # a parameter the email package cannot read: a hostile header
            name = ""
        return re.split(r"[/\\]", str(name))[-1]

    @cached_property
    def filenames(self) -> tuple[str, ...]:
        """Every name the part gives itself, as any mail client may read it (filenames)."""
        return filenames(self.headers, self.filename)

    @cached_property
    def transfer_encoding(self) -> str:
        encoding = str(self.headers.get("content-transfer-encoding", "")).strip().lower()
        return encoding if encoding in ("base64", "quoted-printable") else ""


# A file-name parameter, read as leniently as the most lenient mail client: after `;` or
# white space, quoted or not, with its RFC 2231 section number and `*` when it has them.
_NAME_PARAMETER = re.compile(
    r"""(?:^|[;\s])\s*((?:file)?name)(?:\*(\d+))?(\*)?\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)""",
    re.I)
ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")  # RFC 2047
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def filenames(headers: EmailMessage, parsed: str = "") -> tuple[str, ...]:
    """Every name a part has, each without its folders: each `name`/`filename` parameter
    of each Content-Type and Content-Disposition field (repeated fields each read), in
    every form (quoted or not, RFC 2231 `*` values, RFC 2047 encoded words anywhere), RFC
    2231 sections joined in order (all of them, and as far as the first gap), each cut at
    a NUL and with its NULs dropped; and `parsed`, the email package's reading. A sender
    who gives a harmless name to one reader and a program to another is caught by both."""
    found: list[str] = [parsed] if parsed else []
    for field, raw in headers.raw_items():
        if field.lower() not in ("content-type", "content-disposition"):
            continue
        value = _FOLD.sub("", raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        sections: dict[tuple[str, int], str] = {}
        charset = "utf-8"
        for match in _NAME_PARAMETER.finditer(value):
            key, number, extended, text = match.groups()
            text = text.strip()
            if text.startswith('"'):
                text = re.sub(r"\\(.)", r"\1", text[1:-1] if text.endswith('"') and
                              len(text) > 1 else text[1:])
            if extended:
                if number in (None, "0") and text.count("'") >= 2:
                    charset, _, text = text.split("'", 2)
                text = _percent_decoded(text, charset)
            text = ENCODED_WORD.sub(decoded_word, text)
            if number is None:
                found.append(text)
            else:
                sections[(key.lower(), int(number))] = text
        for key in {key for key, _ in sections}:
            numbers = sorted(n for k, n in sections if k == key)
            found.append("".join(sections[(key, n)] for n in numbers))
            gap = next((n for n in range(len(numbers) + 1) if n not in numbers), 0)
            found.append("".join(sections[(key, n)] for n in range(gap)))
    names: list[str] = []
    for name in found:
        for variant in (name.split("\0")[0], name.replace("\0", "")):
            variant = re.split(r"[/\\]", variant)[-1]
            if variant and variant not in names:
                names.append(variant)
    return tuple(names)


def _percent_decoded(text: str, charset: str) -> str:
    raw = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
    return in_charset(raw.encode("latin-1", "replace"), charset)


def in_charset(data: bytes, charset: str | None, final: bool = True) -> str:
    """`data` decoded from the sender's `charset`, errors replaced: UTF-8 when none is
    given, or it is ASCII (a superset), unknown, no text encoding (zlib, bz2, base64,
    rot13: a sender's charset never decompresses anything), or one that cannot replace
    errors (idna, punycode: they raise instead). With `final` False an incomplete
    character at the end (cut by a limit) is left out."""
    name = (charset or "").strip().lower() or "utf-8"
    if name in ("us-ascii", "ascii"):
        name = "utf-8"
    for candidate in (name, "utf-8"):
        try:
            if not codecs.lookup(candidate)._is_text_encoding:  # what bytes.decode checks
                continue
            return str(codecs.getincrementaldecoder(candidate)("replace").decode(data, final))
        except (LookupError, ValueError, TypeError):  # ValueError: UnicodeError, a NUL
            continue
    return data.decode("utf-8", "replace")


def decoded_word(match: re.Match[str]) -> str:
    """One RFC 2047 encoded word (`=?charset?B|Q?text?=`, the match's three groups)
    decoded; as it was when its encoding is broken."""
    charset, encoding, text = match.groups()
    try:
        if encoding in "bB":
            data = binascii.a2b_base64(text + "=" * (-len(text) % 4))
        else:
            data = binascii.a2b_qp(text.replace("_", " ").encode("latin-1", "replace"),
                                   header=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    return in_charset(data, charset.split("*")[0])  # RFC 2231: charset*language


def header_end(message: bytes, start: int, end: int) -> int:
    """Where the body of the part starting at `start` begins (after the blank line)."""
    if message.startswith(b"\r\n", start):
        return start + 2  # no header fields at all
    blank = message.find(b"\r\n\r\n", start, end)
    return end if blank < 0 else blank + 4


def _delimiters(boundary: str) -> re.Pattern[bytes]:
    """A delimiter line: after a line break (whose CRLF belongs to the delimiter),
    `--boundary`, `--` more for the closing one, then white space only."""
    return re.compile(rb"(?<=\n)--" + re.escape(boundary.encode("ascii"))
                      + rb"(--)?[ \t]*(?:\r\n|\Z)")


def walk(message: bytes, max_parts: int = 1000, max_depth: int = 30) -> Iterator[Part]:
    """The leaf parts in order: every part that is neither a multipart with a boundary nor
    an attached message (message/rfc822 is walked into). MimeTooComplex past the limits."""
    stack = [(0, len(message), 0)]
    seen = 0
    while stack:
        start, end, depth = stack.pop()
        seen += 1
        if seen > max_parts:
            raise MimeTooComplex(f"more than {max_parts} MIME parts")
        if depth > max_depth:
            raise MimeTooComplex(f"MIME parts nested deeper than {max_depth}")
        body = header_end(message, start, end)
        headers = _HEADERS.parsebytes(message[start:body])
        content_type = headers.get_content_type()
        boundary = headers.get_param("boundary") if content_type.startswith("multipart/") else None
        if isinstance(boundary, str) and 0 < len(boundary) <= MAX_BOUNDARY and \
                boundary.isascii():
            stack.extend(reversed(_children(message, body, end, boundary, depth + 1)))
        elif content_type == "message/rfc822" and body < end and \
                headers.get("content-transfer-encoding", "7bit").lower() in ("7bit", "8bit",
                                                                              "binary"):
            stack.append((body, end, depth + 1))
        else:
            yield Part(start, body, end, depth, headers, content_type)


def _children(message: bytes, start: int, end: int, boundary: str,
              depth: int) -> list[tuple[int, int, int]]:
    """The (start, end, depth) of each body part between a multipart's delimiters."""
    children: list[tuple[int, int, int]] = []
    opened = -1  # where the current part started, after its delimiter line
    for found in _delimiters(boundary).finditer(message, start, end):
        if opened >= 0:
            children.append((opened, max(opened, found.start() - 2), depth))
        if found.group(1):  # the closing delimiter: only the epilogue follows
            return children
        opened = found.end()
    if opened >= 0:  # no closing delimiter: the last part runs to the end
        children.append((opened, end, depth))
    return children


def transfer_encoding(part: Part) -> str:
    """base64, quoted-printable, or "" for a body sent as it is (7bit, 8bit, binary)."""
    return part.transfer_encoding


def decode_body(message: bytes, part: Part, limit: int | None = None) -> bytes:
    """The part's body, its transfer encoding undone; at most about `limit` bytes (None:
    all). Broken base64 is decoded as far as it goes, as mail clients do: a sender cannot
    hide a file from the check by spoiling its encoding."""
    encoding = transfer_encoding(part)
    # Only the bytes the limit needs are copied out of the message (base64 with its line
    # breaks, quoted-printable at worst three bytes a byte).
    needed = {"base64": 2, "quoted-printable": 3}.get(encoding, 1)
    end = part.end if limit is None else min(part.end, part.body_start + limit * needed + 4096)
    raw = message[part.body_start:end]
    if encoding == "base64":
        data = raw.translate(None, _NOT_BASE64)
        if len(data) % 4 == 1:
            data = data[:-1]  # half a byte: nothing to decode
        data += b"=" * (-len(data) % 4)
        try:
            decoded = binascii.a2b_base64(data)
        except binascii.Error:
            decoded = b""
    elif encoding == "quoted-printable":
        decoded = binascii.a2b_qp(raw)
    else:
        decoded = raw
    return decoded if limit is None else decoded[:limit]
