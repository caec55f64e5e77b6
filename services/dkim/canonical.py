"""DKIM canonicalisation (RFC 6376 section 3.4), streaming for bodies.

A milter receives the body in chunks of up to 64 KiB; `BodyHasher` canonicalises and hashes
each chunk as it comes, so a 50 MB message costs no memory. Trailing empty lines are held
back (they count only if more text follows), as is an incomplete last line.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

SIMPLE: Final = "simple"
RELAXED: Final = "relaxed"
CANONICALIZATIONS: Final = (SIMPLE, RELAXED)

# Runs that relaxed canonicalisation changes: any with a tab, or two spaces or more. Single
# spaces, by far the most common, stay as they are, so they are not even matched.
_WSP_TO_COMPRESS = re.compile(rb"[ \t]*\t[ \t]*| {2,}")
_SPACE_BEFORE_EOL = re.compile(rb" +\n")
_LINE_BREAK = re.compile(rb"\r?\n")
_HASHES = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}


class BodyHasher:
    """Canonical body hash for one (canonicalisation, hash, l= limit) combination."""

    def __init__(self, canonicalization: str, hash_name: str = "sha256",
                 limit: int | None = None) -> None:
        if canonicalization not in CANONICALIZATIONS:
            raise ValueError(f"unknown body canonicalization {canonicalization!r}")
        self.relaxed = canonicalization == RELAXED
        self._hash = _HASHES[hash_name]()
        self.limit = limit
        self.length = 0  # canonical bytes hashed so far
        self.total = 0  # canonical bytes seen, beyond the limit too
        self._pending_empty_lines = 0
        self._partial = b""

    def update(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        if end:
            self._lines(data[:end])

    def _lines(self, lines: bytes) -> None:
        """Complete lines, each ending in \\n (CRLF or a bare LF, both taken as a line end)."""
        text = lines.replace(b"\r\n", b"\n")
        if self.relaxed:
            text = _compress(text)
            if b" \n" in text:
                text = _SPACE_BEFORE_EOL.sub(b"\n", text)
        content = text.rstrip(b"\n")
        empty_lines = len(text) - len(content)
        if not content:
            self._pending_empty_lines += empty_lines
            return
        # `content` ends with a non-empty line; the empty lines after it wait for more text.
        self._emit(b"\r\n" * self._pending_empty_lines + content.replace(b"\n", b"\r\n") + b"\r\n")
        self._pending_empty_lines = empty_lines - 1

    def _emit(self, canonical: bytes) -> None:
        self.total += len(canonical)
        if self.limit is not None:
            room = self.limit - self.length
            if room <= 0:
                return
            canonical = canonical[:room]
        self.length += len(canonical)
        self._hash.update(canonical)

    def digest(self) -> bytes:
        """The body hash; the hasher is finished after this."""
        if self._partial:
            # A last line without CRLF gets one (RFC 6376 3.4.3 and 3.4.4).
            partial, self._partial = self._partial, b""
            self._lines(partial + b"\n")
        if self.length == 0 and not self.relaxed and self.limit != 0:
            # Simple: an empty body is one CRLF. Relaxed: an empty body stays empty.
            self._emit(b"\r\n")
        return self._hash.digest()


def _compress(text: bytes) -> bytes:
    """Every run of spaces and tabs as one space (the membership tests are much cheaper
    than a substitution that finds nothing to change)."""
    if b"\t" in text or b"  " in text:
        return _WSP_TO_COMPRESS.sub(b" ", text)
    return text


def field_name(name: bytes) -> bytes:
    """A header name as compared: any case, and without the white space Postfix allows
    before the colon ("Authentication-Results :" is that header too)."""
    return name.rstrip(b" \t").lower()


def header_value_crlf(value: bytes) -> bytes:
    """Postfix folds header values with bare \\n; DKIM hashes the CRLF form of the message."""
    if b"\n" not in value:
        return value
    return _LINE_BREAK.sub(b"\r\n", value)


def canonical_header(name: bytes, value: bytes, relaxed: bool) -> bytes:
    """`name:value\\r\\n` canonicalised; `value` is everything after the colon, in CRLF form."""
    if relaxed:
        unfolded = _compress(value.replace(b"\r\n", b"").replace(b"\n", b"") if b"\n" in value
                             else value)
        return name.lower().rstrip(b" \t") + b":" + unfolded.strip(b" \t") + b"\r\n"
    return name + b":" + value + b"\r\n"


def select_headers(headers: list[tuple[bytes, bytes]],
                   names: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The header instances that h= names, each name taking instances from the bottom up
    (RFC 6376 5.4.2); a name with no instance left is skipped (it signs an absence)."""
    positions: dict[bytes, list[int]] = {}
    for index, (name, _) in enumerate(headers):
        positions.setdefault(name.lower(), []).append(index)
    chosen = []
    for name in names:
        left = positions.get(name)
        if left:
            chosen.append(headers[left.pop()])  # the lowest instance not taken yet
    return chosen


def header_hash_input(headers: list[tuple[bytes, bytes]], names: list[bytes],
                      signature_header: tuple[bytes, bytes], relaxed: bool) -> bytes:
    """The bytes the header hash covers: the selected headers, then the DKIM-Signature
    itself with its b= value emptied and without its final CRLF (RFC 6376 3.7)."""
    parts = [canonical_header(name, value, relaxed)
             for name, value in select_headers(headers, names)]
    name, value = signature_header
    parts.append(canonical_header(name, value, relaxed)[:-2])
    return b"".join(parts)
