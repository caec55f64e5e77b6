"""Raw message helpers shared by the filters: SMTP transparency both ways (the DATA stream
in, dot-stuffed pieces out), line endings, header insertion and removal.

Messages stay bytes from end to end: decoding and re-encoding a mail would alter what DKIM
signed and what the scanners saw. A message is held once, in one piece: what goes out is
built as a few pieces around it (the headers added, the headers kept, the body as a view),
never as whole copies, so that a 10 MB message costs a filter a small multiple of 10 MB
whatever its line structure.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

# A CR not followed by LF, or an LF not preceded by CR: a bare line ending.
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# In a header value the stack adds, CR and LF may only fold a line (before a space or tab).
_UNFOLDED_BREAK = re.compile(r"\r(?!\n)|\n(?![ \t])")


def has_bare_newlines(message: bytes) -> bool:
    return _BARE_NEWLINE.search(message) is not None


def normalize_newlines(message: bytes) -> bytes:
    """Turn a bare LF into CRLF, as Postfix's `smtpd_forbid_bare_newline = normalize` does,
    and a stray CR into a space: no line ending can then be read two ways by two programs.
    A CR is no line end for Postfix (before 3.7.10 it passes one through as text); made a
    line break here, it would start a header that the milter never saw."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") == crlf and message.count(b"\r") == crlf:
        return message  # the usual case, decided by three scans in C instead of a regex
    return _BARE_LF.sub(b"\r\n", _BARE_CR.sub(b" ", message))


# A header field's first line: a name of printable characters but ":", then a colon.
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
# The first line break not followed by another header field or a continuation line.
_AFTER_HEADERS = re.compile(rb"\r\n(?![!-9;-~]+[ \t]*:|[ \t])")


def header_block_end(message: bytes) -> int:
    """Where the header fields end: at the blank line, or at the first line that is no
    header field (as Postfix's cleanup reads a message without a blank line)."""
    if not _HEADER_LINE.match(message):
        return 0
    found = _AFTER_HEADERS.search(message)
    return len(message) if found is None else found.start() + 2


@functools.lru_cache(maxsize=16)
def _fields_named(names: frozenset[str]) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(name.lower().encode()) for name in sorted(names))
    return re.compile(rb"^(?:" + alternatives + rb")[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*"
                      rb"(?:\r\n|\Z)", re.I | re.M)


def check_header_value(value: str) -> str:
    """A header value the stack adds, refused (ValueError) if a CR or LF in it could end
    the header and start another: only folds (a line break before a space or tab) pass."""
    if _UNFOLDED_BREAK.search(value):
        raise ValueError(f"CR or LF in a header value: {value[:80]!r}")
    return value


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Header fields as they go on top of a message, newest first, as every MTA does."""
    return b"".join(f"{name}: {check_header_value(value)}\r\n".encode()
                    for name, value in headers)


def prepend_headers(message: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Add headers on top, newest first, as every MTA and filter does."""
    return header_block(headers) + message


def split_headers(message: bytes, names: set[str]) -> tuple[bytes, int]:
    """The header block without the fields named (with their folded lines), and where the
    rest of the message starts: the blank line, then the body, to be sent from a view.
    One regular expression over the header block: no object per line, however many."""
    end = header_block_end(message)
    headers = memoryview(message)[:end]
    return (_fields_named(frozenset(names)).sub(b"", headers) if names else bytes(headers)), end


def remove_headers(message: bytes, names: set[str]) -> bytes:
    """Drop every header field (with its folded lines) whose name is in `names`.

    Used against forgery: an X-Spam-Flag or X-Virus-Infected header written by the sender
    must not survive next to the one the filter adds.
    """
    kept, body = split_headers(message, names)
    return kept + message[body:]


def header_value(message: bytes, name: str) -> str | None:
    """The first value of a header, unfolded (None when absent)."""
    end = header_block_end(message)
    pattern = re.compile(
        rb"^" + re.escape(name.encode()) + rb"[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.I | re.M
    )
    found = pattern.search(message[:end])
    if found is None:
        return None
    return re.sub(rb"\r\n[ \t]", b" ", found.group(1)).strip().decode("utf-8", "replace")


class DotDecoder:
    """The DATA stream (RFC 5321 4.5.2), sans I/O: fed what arrives, in any chunking, it
    collects the message with the transparency dots removed until the line holding only a
    dot. Chunks, not lines, are kept: aiosmtpd kept one object per line, 40 times a message
    made of empty lines. Then `done` is set, `message()` gives the message and `rest` what
    followed the final dot (commands the client pipelined). Over `limit` bytes the data is
    read to its end but not kept (`too_big`).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.size = 0
        self.too_big = False
        self.done = False
        self.rest = b""
        self._chunks: list[bytes] = []
        self._partial = b""  # an unfinished line; always starts at a line start

    def feed(self, data: bytes) -> None:
        data = self._partial + data if self._partial else data
        # Every piece handled starts at a line start, so a CRLF before it stands for the
        # line break that came before it.
        end = (b"\r\n" + data).find(b"\r\n.\r\n")
        if end >= 0:
            complete, self.rest, self.done = data[:end], data[end + 3:], True
            self._partial = b""
        else:
            cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0
            complete, self._partial = data[:cut], data[cut:]
        if complete:
            self._keep(complete)

    def _keep(self, lines: bytes) -> None:
        self.size += len(lines)
        if self.too_big or (self.limit is not None and self.size > self.limit):
            self.too_big, self._chunks = True, []
            return
        # The dot a client adds to a line starting with one (any line: RFC 5321 4.5.2).
        unstuffed = lines.replace(b"\r\n.", b"\r\n")
        self._chunks.append(unstuffed[1:] if unstuffed.startswith(b".") else unstuffed)

    def message(self) -> bytes:
        message = b"".join(self._chunks)
        self._chunks = []
        return message


def dot_stuffed(pieces: list[bytes | memoryview], slice_size: int = 1 << 20) -> Iterator[bytes]:
    """The pieces of a message (each starting at a line start, CRLF line endings only) as
    SMTP sends them: a dot added to each line starting with one, a final CRLF if the last
    line had none, and the end-of-data line. Large pieces go out in slices cut after a
    CRLF, so that no whole copy of a big message is made."""
    last = b""
    for piece in pieces:
        view = memoryview(piece)
        start = 0
        while start < len(view):
            cut = len(view)
            if cut - start > slice_size:  # cut after a CRLF near slice_size
                cut = bytes(view[start + slice_size - 2: start + slice_size + 65536]).find(
                    b"\r\n")
                cut = len(view) if cut < 0 else start + slice_size + cut
            chunk = bytes(view[start:cut])
            stuffed = chunk.replace(b"\r\n.", b"\r\n..")
            yield b"." + stuffed if stuffed.startswith(b".") else stuffed
            last, start = chunk[-2:], cut
    yield b".\r\n" if last == b"\r\n" else b"\r\n.\r\n"


def dot_stuff(message: bytes) -> bytes:
    """SMTP transparency (RFC 5321 4.5.2): a line starting with a dot gets one more.

    The message must have CRLF line endings only (see normalize_newlines), so that the
    end-of-data sequence cannot appear inside it.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed
