"""The milter codec against golden packets, fed whole and in chunks of 4096, 128, 16 and 1.

`data/postfix37_milter_session.bin` is what Debian's Postfix 3.7.11 sent to a milter that
negotiated SecuMail's options: two messages on one connection (recorded once with a socket
that answered as the milter does; see the module docstring of services/dkim/milter.py for
the options).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secumail.protocols import milter as mc

POSTFIX_SESSION = (Path(__file__).parent / "data" / "postfix37_milter_session.bin").read_bytes()


def feed_in_chunks(data: bytes, size: int, decoder: mc.MilterDecoder) -> list[mc.Command]:
    commands: list[mc.Command] = []
    for start in range(0, len(data), size):
        commands.extend(decoder.feed(data[start : start + size]))
    return commands


CHUNKS = [len(POSTFIX_SESSION), 4096, 128, 16, 1]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_postfix_session_any_chunking(chunk: int) -> None:
    decoder = mc.MilterDecoder()
    commands = feed_in_chunks(POSTFIX_SESSION, chunk, decoder)
    assert not decoder.pending
    kinds = [type(c).__name__ for c in commands if not isinstance(c, mc.DefineMacros)]
    one_message = [
        "MailFrom",
        *["Header"] * 7,
        "EndOfHeaders",
        "BodyChunk",
        "EndOfMessage",
        "Abort",
    ]
    assert kinds == ["OptionNegotiation", "Connect", *one_message, *one_message, "Abort", "Quit"]
    negotiation, connect_macros, connect = commands[:3]
    assert negotiation == mc.OptionNegotiation(6, 0x1FF, 0x1FFFFF)
    assert isinstance(connect_macros, mc.DefineMacros) and connect_macros.stage == b"C"
    assert connect_macros.macros["j"] == "mx.secumail.test"
    assert connect_macros.macros["daemon_addr"] == "127.0.0.1"
    assert connect_macros.macros["v"] == "Postfix 3.7.11"
    assert isinstance(connect, mc.Connect)
    assert (connect.hostname, connect.family, connect.address) == ("localhost", "4", "127.0.0.1")
    headers = [c for c in commands if isinstance(c, mc.Header)][:7]
    assert headers[0] == mc.Header(b"From", b" Alice <alice@secumail.test>")
    # A folded header keeps its line break (a bare \n from Postfix) and its indentation;
    # with HEADER_LEADING_SPACE the space after the colon is kept too.
    assert headers[2] == mc.Header(b"Subject", b" folded\n  subject line")
    assert headers[3] == mc.Header(b"X-Empty", b"")
    assert headers[4] == mc.Header(b"X-Tab", b"\tvalue")
    [body, *_] = [c for c in commands if isinstance(c, mc.BodyChunk)]
    assert body.data == b"Hello  world.  \r\n\r\n\r\n"
    mail = next(c for c in commands if isinstance(c, mc.MailFrom))
    assert mail.sender == "<alice@secumail.test>"
    queue_ids = {
        c.macros["i"] for c in commands if isinstance(c, mc.DefineMacros) and c.stage == b"E"
    }
    assert len(queue_ids) == 2


def raw(code: bytes, data: bytes) -> bytes:
    """A packet as the protocol describes it: 4-byte big-endian length, command, data."""
    return (len(data) + 1).to_bytes(4, "big") + code + data


# (packets written out from the protocol description, expected command)
GOLDEN = [
    (
        raw(b"O", bytes.fromhex("00000006000001ff001fffff")),
        mc.OptionNegotiation(6, 0x1FF, 0x1FFFFF),
    ),
    (
        raw(b"D", b"C{client_addr}\x00192.0.2.1\x00j\x00mx\x00"),
        mc.DefineMacros(b"C", {"client_addr": "192.0.2.1", "j": "mx"}),
    ),
    (raw(b"D", b"M"), mc.DefineMacros(b"M", {})),
    (
        raw(b"C", b"mail.example\x004\x00\x19192.0.2.1\x00"),
        mc.Connect("mail.example", "4", 25, "192.0.2.1"),
    ),
    (
        raw(b"C", b"v6.example\x006\x01\xbb2001:db8::1\x00"),
        mc.Connect("v6.example", "6", 443, "2001:db8::1"),
    ),
    (
        raw(b"C", b"localhost\x00L\x00\x00/run/smtpd.sock\x00"),
        mc.Connect("localhost", "L", 0, "/run/smtpd.sock"),
    ),
    (raw(b"C", b"unknown\x00U"), mc.Connect("unknown", "U", 0, "")),
    (raw(b"H", b"mx.test\x00"), mc.Helo("mx.test")),
    (
        raw(b"M", b"<a@b.example>\x00SIZE=1000\x00"),
        mc.MailFrom("<a@b.example>", ["SIZE=1000"]),
    ),
    (raw(b"M", b"<>\x00"), mc.MailFrom("<>", [])),
    (raw(b"R", b"<c@d.example>\x00"), mc.RcptTo("<c@d.example>", [])),
    (raw(b"T", b""), mc.Data()),
    (raw(b"L", b"Subject\x00 hi\x00"), mc.Header(b"Subject", b" hi")),
    (raw(b"N", b""), mc.EndOfHeaders()),
    (raw(b"B", b"body\n"), mc.BodyChunk(b"body\n")),
    (raw(b"B", b""), mc.BodyChunk(b"")),
    (raw(b"E", b""), mc.EndOfMessage(b"")),
    (raw(b"E", b"end"), mc.EndOfMessage(b"end")),
    (raw(b"A", b""), mc.Abort()),
    (raw(b"Q", b""), mc.Quit()),
    (raw(b"K", b""), mc.QuitNewConnection()),
    (raw(b"U", b"HELP\x00"), mc.UnknownCommand("HELP")),
]


@pytest.mark.parametrize("chunk", [4096, 128, 16, 1])
@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_golden_packets_any_chunking(data: bytes, expected: mc.Command, chunk: int) -> None:
    decoder = mc.MilterDecoder()
    assert feed_in_chunks(data * 3, chunk, decoder) == [expected] * 3
    assert not decoder.pending


def test_all_golden_packets_back_to_back() -> None:
    stream = b"".join(data for data, _ in GOLDEN)
    for chunk in (4096, 128, 16, 1):
        commands = feed_in_chunks(stream, chunk, mc.MilterDecoder())
        assert commands == [expected for _, expected in GOLDEN]


MALFORMED = [
    (b"\x00\x00\x00\x00", "empty packet"),
    (b"\x7f\xff\xff\xff", "exceeds"),
    (raw(b"Z", b""), "unknown command byte 0x5a"),
    (raw(b"O", b"\x00\x00\x00\x06"), "truncated"),
    (raw(b"O", bytes(12)), "too old"),
    (raw(b"H", b"mx.test\x00\x00"), "trailing data"),
    (raw(b"D", b""), "without a stage"),
    (raw(b"D", b"Cj\x00"), "without a value"),
    (raw(b"D", b"C\x00x\x00"), "empty macro name"),
    (raw(b"D", b"Cjx"), "NUL"),
    (raw(b"C", b"host"), "truncated"),
    (raw(b"C", b"host\x00X"), "address family"),
    (raw(b"C", b"host\x004\x00"), "truncated address"),
    (raw(b"C", b"host\x004\x00\x19ab\x00c"), "NUL"),
    (raw(b"C", b"host\x004\x00\x19a\x00b\x00"), "trailing data"),
    (raw(b"H", b"ab"), "NUL"),
    (raw(b"M", b""), "NUL"),
    (raw(b"L", b"a\x00b"), "NUL"),
    (raw(b"L", b"a\x00"), "expected a name and a value"),
    (raw(b"L", b"\x00b\x00"), "empty name"),
    (raw(b"L", b"a\x00b\x00c\x00"), "expected a name and a value"),
    (raw(b"N", b"x"), "unexpected data"),
    (raw(b"A", b"x"), "unexpected data"),
    (raw(b"Q", b"x"), "unexpected data"),
    (raw(b"T", b"x"), "unexpected data"),
    (raw(b"K", b"x"), "unexpected data"),
    (raw(b"U", b"x"), "NUL"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_packets_are_refused(data: bytes, message: str) -> None:
    for chunk in (4096, 1):
        with pytest.raises(mc.MilterProtocolError, match=message):
            feed_in_chunks(data, chunk, mc.MilterDecoder(max_packet=1 << 20))


def test_half_packet_is_pending() -> None:
    decoder = mc.MilterDecoder()
    assert decoder.feed(b"\x00\x00\x00\x06Bbod") == []
    assert decoder.pending
    assert decoder.feed(b"y\n") == [mc.BodyChunk(b"body\n")]
    assert not decoder.pending


def test_a_large_body_chunk_is_one_command() -> None:
    chunk = b"x" * 65535
    assert mc.MilterDecoder().feed(mc.encode_body(chunk)) == [mc.BodyChunk(chunk)]


def test_negotiation_takes_the_intersection() -> None:
    offer = mc.OptionNegotiation(
        6, mc.ACTION_ADD_HEADERS | mc.ACTION_SET_SYMBOL_LIST, mc.NO_HELO | mc.NO_REPLY_HEADER
    )
    agreed = mc.negotiate(
        offer,
        mc.ACTION_ADD_HEADERS | mc.ACTION_CHANGE_HEADERS,
        mc.NO_HELO | mc.NO_REPLY_HEADER | mc.NO_REPLY_BODY | mc.HEADER_LEADING_SPACE,
        {mc.STAGE_MAIL: "{auth_authen}"},
    )
    assert agreed.actions == mc.ACTION_ADD_HEADERS
    assert agreed.protocol == mc.NO_HELO | mc.NO_REPLY_HEADER
    assert not agreed.header_leading_space
    assert not agreed.needs_reply(mc.Header(b"a", b"b"))
    assert agreed.needs_reply(mc.BodyChunk(b""))  # NO_REPLY_BODY was not offered
    assert agreed.needs_reply(mc.EndOfHeaders())
    assert not agreed.needs_reply(mc.DefineMacros(b"C", {}))
    assert not agreed.needs_reply(mc.Abort())
    [reply] = mc.ReplyDecoder().feed(agreed.reply)
    assert reply.negotiation == mc.OptionNegotiation(6, mc.ACTION_ADD_HEADERS, agreed.protocol)
    assert reply.data.endswith(b"\x00\x00\x00\x02{auth_authen}\x00")


def test_no_symbol_list_unless_offered() -> None:
    agreed = mc.negotiate(
        mc.OptionNegotiation(6, mc.ACTION_ADD_HEADERS, 0), 0x1FF, 0, {mc.STAGE_MAIL: "i"}
    )
    assert len(agreed.reply) == 4 + 1 + 12
    older = mc.negotiate(mc.OptionNegotiation(2, 0x1FF, 0), 0x1FF, 0, {mc.STAGE_MAIL: "i"})
    assert older.version == 2 and len(older.reply) == 17


def test_reply_encoders_round_trip() -> None:
    stream = (
        mc.encode_insert_header(0, b"DKIM-Signature", b" v=1;\n\tb=abc")
        + mc.encode_add_header(b"X-A", b" b")
        + mc.encode_change_header(2, b"Authentication-Results", b"")
        + mc.encode_reply_code("550 5.7.1 100% refused\r\n")
        + mc.CONTINUE
        + mc.ACCEPT
        + mc.TEMPFAIL
        + mc.REJECT
    )
    decoder = mc.ReplyDecoder()  # fed one byte at a time
    replies = [r for i in range(len(stream)) for r in decoder.feed(stream[i : i + 1])]
    assert [r.code for r in replies] == ["i", "h", "m", "y", "c", "a", "t", "r"]
    assert (replies[0].index, replies[0].name, replies[0].value) == (
        0,
        b"DKIM-Signature",
        b" v=1;\n\tb=abc",
    )
    assert (replies[2].index, replies[2].value) == (2, b"")
    assert replies[3].value == b"550 5.7.1 100%% refused  "
    assert [r.final for r in replies] == [False, False, False, True, True, True, True, True]


def test_nul_bytes_cannot_cut_an_inserted_header() -> None:
    [reply] = mc.ReplyDecoder().feed(mc.encode_add_header(b"X\0-A", b" a\0b"))
    assert (reply.name, reply.value) == (b"X-A", b" ab")


@pytest.mark.parametrize("bad", ["250 ok", "5", "abc def", ""])
def test_reply_code_must_be_an_error(bad: str) -> None:
    with pytest.raises(ValueError):
        mc.encode_reply_code(bad)


# --- fuzzing ------------------------------------------------------------------------------

# As many examples as the Hypothesis profile says (100; 3,000 with HYPOTHESIS_PROFILE=fuzz).
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decoded(stream: bytes, chunk: int, max_packet: int) -> list[mc.Command] | str:
    """The commands in `stream` fed `chunk` bytes at a time, or the protocol error."""
    try:
        return feed_in_chunks(stream, chunk, mc.MilterDecoder(max_packet=max_packet))
    except mc.MilterProtocolError:
        return "protocol error"


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 64))
def test_any_bytes_decode_the_same_in_any_chunking(stream: bytes, chunk: int) -> None:
    """Commands or a protocol error, never another exception, and the same outcome whether
    the bytes come at once or in pieces (no state lost at a chunk boundary)."""
    whole = decoded(stream, len(stream) or 1, 4096)
    assert decoded(stream, chunk, 4096) == whole
    assert whole == "protocol error" or all(isinstance(c, mc.Command) for c in whole)


@FUZZ
@given(st.data())
def test_a_mutated_postfix_session_decodes_the_same_in_any_chunking(data: st.DataObject
                                                                    ) -> None:
    session = bytearray(POSTFIX_SESSION)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(session) - 1))
        session[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, 300))
    assert decoded(bytes(session), cut, 65536) == decoded(bytes(session), len(session), 65536)


_text = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=20)
_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
_commands = st.one_of(
    st.builds(
        lambda v, a, p: (mc.encode_negotiation(v, a, p), mc.OptionNegotiation(v, a, p)),
        st.integers(2, 6),
        st.integers(0, 0x1FF),
        st.integers(0, 0x1FFFFF),
    ),
    st.builds(
        lambda h, a, p: (mc.encode_connect(h, "4", p, a), mc.Connect(h, "4", p, a)),
        _text,
        _text,
        st.integers(0, 65535),
    ),
    st.builds(
        lambda s, args: (mc.encode_mail(s, *args), mc.MailFrom(s, args)),
        _text,
        st.lists(_text, max_size=3),
    ),
    st.builds(lambda s: (mc.encode_rcpt(s), mc.RcptTo(s, [])), _text),
    st.builds(lambda n, v: (mc.encode_header(n, v), mc.Header(n, v)), _bytes.filter(bool), _bytes),
    st.builds(lambda b: (mc.encode_body(b), mc.BodyChunk(b)), st.binary(max_size=200)),
    st.builds(
        lambda m: (mc.encode_macros(b"M", m), mc.DefineMacros(b"M", m)),
        st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _text, max_size=4),
    ),
    st.just((mc.END_OF_HEADERS, mc.EndOfHeaders())),
    st.just((mc.END_OF_MESSAGE, mc.EndOfMessage(b""))),
    st.just((mc.ABORT, mc.Abort())),
    st.just((mc.DATA, mc.Data())),
    st.just((mc.QUIT, mc.Quit())),
)


@FUZZ
@given(st.lists(_commands, min_size=1, max_size=12), st.integers(1, 64))
def test_encoded_commands_decode_back_in_any_chunking(
    pairs: list[tuple[bytes, mc.Command]], chunk: int
) -> None:
    stream = b"".join(encoded for encoded, _ in pairs)
    decoder = mc.MilterDecoder()
    assert feed_in_chunks(stream, chunk, decoder) == [command for _, command in pairs]
    assert not decoder.pending
