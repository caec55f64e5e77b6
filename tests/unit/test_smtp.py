"""SMTP's codec without sockets: replies in any chunking, the DATA stream both ways."""

from __future__ import annotations

import pytest

from secumail.protocols.smtp import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    DotDecoder,
    ReplyDecoder,
    SmtpReply,
    SmtpUnavailable,
    dot_stuffed,
    parameter_problem,
)

CHUNKS = [4096, 128, 16, 1]


def dot_stuff(message: bytes) -> bytes:
    """The message as it goes on the wire, without the end-of-data line."""
    return b"".join(dot_stuffed([message]))[:-3]


def fed(decoder: ReplyDecoder, data: bytes, chunk: int) -> list[SmtpReply]:
    replies = []
    for start in range(0, len(data), chunk):
        replies += decoder.feed(data[start:start + chunk])
    return replies


@pytest.mark.parametrize("chunk", CHUNKS)
def test_replies_in_any_chunking(chunk: int) -> None:
    wire = (b"220 next.test ESMTP\r\n250-next.test\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR"
            b"\r\n550 5.1.1 <x@y>: Recipient address rejected\n354 go\r\n")
    decoder = ReplyDecoder()
    replies = fed(decoder, wire, chunk)
    assert [r.code for r in replies] == [220, 250, 550, 354]
    assert replies[1].lines == ("next.test", "PIPELINING", "XFORWARD NAME ADDR")
    assert str(replies[1]) == "250-next.test\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR"
    assert not replies[2].ok and replies[3].ok
    assert not decoder.pending


@pytest.mark.parametrize("junk", [b"HTTP/1.1 400 Bad\r\n", b"25 short\r\n", b"250+odd\r\n",
                                  b"250-x\r\n" * 101, b"250 " + b"a" * 5000])
def test_anything_but_replies_is_refused(junk: bytes) -> None:
    with pytest.raises(SmtpUnavailable):
        ReplyDecoder().feed(junk)


WIRE_CASES = [
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"..lead\r\nx\r\n..\r\n.\r\nQUIT\r\n", b".lead\r\nx\r\n.\r\n", b"QUIT\r\n"),
    (b"\r\n\r\n\r\n.\r\nMAIL FROM:<a@b>\r\n", b"\r\n\r\n\r\n", b"MAIL FROM:<a@b>\r\n"),
    (b"a\n.\nb\r\n.x\r\n.\r\n", b"a\n.\nb\r\nx\r\n", b""),  # bare LF ends nothing
    (b"x" * 3000 + b"\r\n.\r\n", b"x" * 3000 + b"\r\n", b""),  # long lines are kept
]


@pytest.mark.parametrize("chunk", CHUNKS)
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


def test_dot_stuffing() -> None:
    assert dot_stuff(b".start\r\nmid\r\n.\r\n..two\r\nend") == (
        b"..start\r\nmid\r\n..\r\n...two\r\nend\r\n"
    )
    assert b"".join(dot_stuffed([b"a\r\n"])) == b"a\r\n.\r\n"


@pytest.mark.parametrize(("parameters", "known", "problem"), [
    (["BODY=8BITMIME", "SMTPUTF8", "SIZE=100", "RET=HDRS", "ENVID=Ab+2Bc"], "mail", None),
    (["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.org"], "rcpt", None),
    (["RET=HDRS"], "rcpt", "555"),
    (["FOO=1"], "mail", "555"),
    (["BODY=BINARYMIME"], "mail", "501"),
    (["SIZE=x"], "mail", "501"),
    (["SIZE=5000"], "mail", "552"),
    (["ENVID=a=b"], "mail", "501"),
    (["NOTIFY=SOMETIMES"], "rcpt", "501"),
    (["ORCPT=nosemicolon"], "rcpt", "501"),
    (["="], "mail", "501"),
])
def test_mail_and_rcpt_parameters(parameters: list[str], known: str, problem: str | None
                                  ) -> None:
    names = MAIL_PARAMETERS if known == "mail" else RCPT_PARAMETERS
    found = parameter_problem(parameters, names, size_limit=1000)
    assert (found[:3] if found else None) == problem
