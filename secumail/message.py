"""Raw message helpers shared by the filters: line endings, header insertion and removal.
(SMTP transparency, the DATA stream both ways, is secumail/protocols/smtp.py's.)

Messages stay bytes from end to end: decoding and re-encoding a mail would alter what DKIM
signed and what the scanners saw. A message is held once, in one piece: what goes out is
built as a few pieces around it (the headers added, the headers kept, the body as a view),
never as whole copies, so that a 10 MB message costs a filter a small multiple of 10 MB
whatever its line structure.
"""

from __future__ import annotations

import functools
import re

# A CR not followed by LF, or an LF not preceded by CR: a bare line ending.
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# In a header value the stack adds, CR and LF may only fold a line (before a space or tab).
_UNFOLDED_BREAK = re.compile(r"\r(?!\n)|\n(?![ \t])")


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


def split_headers(message: bytes, names: set[str]) -> tuple[bytes, int]:
    """The header block without the fields named (with their folded lines), and where the
    rest of the message starts: the blank line, then the body, to be sent from a view.
    One regular expression over the header block: no object per line, however many."""
    end = header_block_end(message)
    headers = memoryview(message)[:end]
    return (_fields_named(frozenset(names)).sub(b"", headers) if names else bytes(headers)), end
