"""Raw message helpers: line endings, dot-stuffing, header insertion and removal."""

from __future__ import annotations

import pytest

from secumail.message import (
    DotDecoder,
    dot_stuff,
    dot_stuffed,
    has_bare_newlines,
    header_value,
    normalize_newlines,
    prepend_headers,
    remove_headers,
    split_headers,
)

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
    assert has_bare_newlines(raw) == (raw != normal)
    assert normalize_newlines(raw) == normal
    assert not has_bare_newlines(normalize_newlines(raw))


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


def test_dot_stuffing() -> None:
    assert dot_stuff(b".start\r\nmid\r\n.\r\n..two\r\nend") == (
        b"..start\r\nmid\r\n..\r\n...two\r\nend\r\n"
    )


def test_prepend_and_remove_headers() -> None:
    cleaned = remove_headers(MESSAGE, {"X-Spam-Flag", "x-spam-status"})
    assert cleaned == (
        b"Received: from a\r\n\tby b\r\nSubject: hi\r\n\r\nX-Spam-Flag: in the body stays\r\n"
    )
    added = prepend_headers(cleaned, [("X-Spam-Flag", "NO"), ("X-Spam-Score", "0.1")])
    assert added.startswith(b"X-Spam-Flag: NO\r\nX-Spam-Score: 0.1\r\nReceived: from a\r\n")


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nBcc: x", "a\n", "a\r\n"])
def test_a_header_value_that_could_start_a_header_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        prepend_headers(b"\r\nbody", [("X-Spam-Status", value)])


def test_folded_header_values_pass() -> None:
    assert prepend_headers(b"\r\n", [("X-A", "one\r\n\ttwo")]) == b"X-A: one\r\n\ttwo\r\n\r\n"


def test_header_value_unfolds() -> None:
    assert header_value(MESSAGE, "x-spam-status") == "Yes, score=99"
    assert header_value(MESSAGE, "Received") == "from a by b"
    assert header_value(MESSAGE, "Missing") is None
    assert header_value(b"no headers at all", "Subject") is None


# --- the DATA stream in, dot-stuffed pieces out ------------------------------------------------

WIRE_CASES = [
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"..lead\r\nx\r\n..\r\n.\r\nQUIT\r\n", b".lead\r\nx\r\n.\r\n", b"QUIT\r\n"),
    (b"\r\n\r\n\r\n.\r\nMAIL FROM:<a@b>\r\n", b"\r\n\r\n\r\n", b"MAIL FROM:<a@b>\r\n"),
    (b"a\n.\nb\r\n.x\r\n.\r\n", b"a\n.\nb\r\nx\r\n", b""),  # bare LF ends nothing
    (b"x" * 3000 + b"\r\n.\r\n", b"x" * 3000 + b"\r\n", b""),  # long lines are kept
]


@pytest.mark.parametrize("chunk", [4096, 128, 16, 1])
@pytest.mark.parametrize(("wire", "message", "rest"), WIRE_CASES)
def test_dot_decoder_in_any_chunking(chunk: int, wire: bytes, message: bytes, rest: bytes
                                     ) -> None:
    decoder = DotDecoder()
    for start in range(0, len(wire), chunk):
        assert not decoder.done
        decoder.feed(wire[start:start + chunk])
        if decoder.done:
            break
    assert decoder.done
    assert decoder.message() == message
    # What followed the final dot in the same chunk is handed back, not lost.
    assert rest.startswith(decoder.rest)


def test_dot_decoder_reads_to_the_end_past_its_limit() -> None:
    decoder = DotDecoder(limit=100)
    decoder.feed(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n")
    assert decoder.too_big and not decoder.done
    decoder.feed(b".\r\nQUIT\r\n")
    assert decoder.done and decoder.rest == b"QUIT\r\n" and decoder.message() == b""


@pytest.mark.parametrize("slice_size", [4, 64, 1 << 20])
def test_dot_stuffed_pieces_round_trip(slice_size: int) -> None:
    body = b"\r\n.line\r\n..two\r\n" + b"line\r\n" * 50 + b".\r\nend"
    pieces: list[bytes | memoryview] = [b"X-Added: 1\r\n", b"Subject: s\r\n", memoryview(body)]
    wire = b"".join(dot_stuffed(pieces, slice_size))
    assert wire.endswith(b"end\r\n.\r\n")
    decoder = DotDecoder()
    decoder.feed(wire)
    assert decoder.done and decoder.message() == b"X-Added: 1\r\nSubject: s\r\n" + body + b"\r\n"
    assert b"".join(dot_stuffed([b"a\r\n"])) == dot_stuff(b"a\r\n") + b".\r\n"


def test_split_headers_removes_named_fields_and_points_at_the_body() -> None:
    kept, body = split_headers(MESSAGE, {"X-Spam-Flag", "x-spam-status"})
    assert kept == b"Received: from a\r\n\tby b\r\nSubject: hi\r\n"
    assert MESSAGE[body:] == b"\r\nX-Spam-Flag: in the body stays\r\n"
    # No blank line: the headers end at the first line that is no header field.
    kept, body = split_headers(b"X-A: 1\r\nnot a header\r\nX-A: 2\r\n", {"x-a"})
    assert (kept, body) == (b"", 8)
