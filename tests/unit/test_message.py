"""Raw message helpers: line endings, the headers the filters add and remove."""

from __future__ import annotations

import pytest

from secumail.message import header_block, normalize_newlines, split_headers
from secumail.protocols.smtp import dot_stuffed


def dot_stuff(message: bytes) -> bytes:
    """The message as it goes on the wire, without the end-of-data line."""
    return b"".join(dot_stuffed([message]))[:-3]


MESSAGE = (
    b"Received: from a\r\n\tby b\r\nX-Spam-Flag: YES\r\nX-Spam-Status: Yes,\r\n"
    b" score=99\r\nSubject: hi\r\n\r\nX-Spam-Flag: in the body stays\r\n"
)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a b "),
        (b"a\r\n.\nMAIL FROM:<x>\n", b"a\r\n.\r\nMAIL FROM:<x>\r\n"),
        (b"\r\r\n\n", b" \r\n\r\n"),
        (b"Subject: x\rBcc: y\r\n", b"Subject: x Bcc: y\r\n"),
    ],
)
def test_bare_lf_becomes_crlf_and_a_stray_cr_a_space(raw: bytes, normal: bytes) -> None:
    assert normalize_newlines(raw) == normal
    stray = normal.replace(b"\r\n", b"")
    assert b"\r" not in stray and b"\n" not in stray


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"],
)
def test_no_end_of_data_survives_normalising_and_stuffing(smuggled: bytes) -> None:
    """The 2023 SMTP smuggling endings: after normalize + stuff, no lone dot line is left."""
    message = b"Subject: x\r\n\r\nbody" + smuggled + b"MAIL FROM:<evil@example>\r\n"
    wire = dot_stuff(normalize_newlines(message))
    assert b"\r\n.\r\n" not in wire
    assert wire.endswith(b"\r\n")


def test_split_headers_removes_named_fields_and_points_at_the_body() -> None:
    kept, body = split_headers(MESSAGE, {"X-Spam-Flag", "x-spam-status"})
    assert kept == b"Received: from a\r\n\tby b\r\nSubject: hi\r\n"
    assert MESSAGE[body:] == b"\r\nX-Spam-Flag: in the body stays\r\n"
    assert split_headers(MESSAGE, set()) == (MESSAGE[:body], body)
    # No blank line: the headers end at the first line that is no header field.
    kept, body = split_headers(b"X-A: 1\r\nnot a header\r\nX-A: 2\r\n", {"x-a"})
    assert (kept, body) == (b"", 8)
    assert split_headers(b"\r\nbody", {"x-a"}) == (b"", 0)


def test_a_million_header_lines_cost_no_object_each() -> None:
    """One regular expression over the header block, whatever its number of lines."""
    message = b"X-Pad: 1\r\n" * 1_000_000 + b"X-Spam-Flag: YES\r\n\r\nbody\r\n"
    kept, body = split_headers(message, {"x-spam-flag"})
    assert len(kept) == 10_000_000 and message[body:] == b"\r\nbody\r\n"


def test_header_block_adds_on_top_in_order() -> None:
    assert header_block([("X-Spam-Flag", "NO"), ("X-Spam-Score", "0.1")]) == (
        b"X-Spam-Flag: NO\r\nX-Spam-Score: 0.1\r\n")
    assert header_block([("X-A", "one\r\n\ttwo")]) == b"X-A: one\r\n\ttwo\r\n"  # a fold


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nBcc: x", "a\n", "a\r\n"])
def test_a_header_value_that_could_start_a_header_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        header_block([("X-Spam-Status", value)])
