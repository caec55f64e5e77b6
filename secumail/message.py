"""Raw message helpers shared by the filters: line endings, header insertion and removal.

Messages stay bytes from end to end: decoding and re-encoding a mail would alter what DKIM
signed and what the scanners saw.
"""

from __future__ import annotations

import re

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


def header_block_end(message: bytes) -> int:
    """Offset of the blank line that ends the headers (len(message) when there is none)."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def check_header_value(value: str) -> str:
    """A header value the stack adds, refused (ValueError) if a CR or LF in it could end
    the header and start another: only folds (a line break before a space or tab) pass."""
    if _UNFOLDED_BREAK.search(value):
        raise ValueError(f"CR or LF in a header value: {value[:80]!r}")
    return value


def prepend_headers(message: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Add headers on top, newest first, as every MTA and filter does."""
    block = b"".join(f"{name}: {check_header_value(value)}\r\n".encode()
                     for name, value in headers)
    return block + message


def remove_headers(message: bytes, names: set[str]) -> bytes:
    """Drop every header field (with its folded lines) whose name is in `names`.

    Used against forgery: an X-Spam-Flag or X-Virus-Infected header written by the sender
    must not survive next to the one the filter adds.
    """
    wanted = {n.lower().encode() for n in names}
    end = header_block_end(message)
    lines = message[:end].split(b"\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name in wanted
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + message[end:]


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
