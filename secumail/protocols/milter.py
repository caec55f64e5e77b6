"""Sendmail milter protocol, version 6 (as Postfix speaks it), sans I/O.

Every packet is a 4-byte big-endian length, then a one-byte command, then `length - 1` bytes
of data. `MilterDecoder` (the filter's side) is fed whatever bytes arrive, in any chunking,
and hands back typed commands; anything that is not a well-formed MTA command raises
`MilterProtocolError`, which the server turns into a defined answer and a closed connection.
The encoders build the filter's replies. The MTA side (`encode_*` commands and
`ReplyDecoder`) is here too, for tests, benchmarks and health probes.

Reference: libmilter's mfdef.h and mfapi.h (sendmail 8.14+), Postfix's milter8.c.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Final

from secumail.netaddr import parse_host_port

# --- protocol constants (mfdef.h) --------------------------------------------------------

PROTOCOL_VERSION: Final = 6

# Actions the filter may take (SMFIF_*).
ACTION_ADD_HEADERS: Final = 0x01
ACTION_CHANGE_BODY: Final = 0x02
ACTION_ADD_RECIPIENT: Final = 0x04
ACTION_DELETE_RECIPIENT: Final = 0x08
ACTION_CHANGE_HEADERS: Final = 0x10
ACTION_QUARANTINE: Final = 0x20
ACTION_CHANGE_FROM: Final = 0x40
ACTION_ADD_RECIPIENT_PAR: Final = 0x80
ACTION_SET_SYMBOL_LIST: Final = 0x100

# Protocol steps the filter may skip or not answer (SMFIP_*).
NO_CONNECT: Final = 0x01
NO_HELO: Final = 0x02
NO_MAIL: Final = 0x04
NO_RCPT: Final = 0x08
NO_BODY: Final = 0x10
NO_HEADERS: Final = 0x20
NO_EOH: Final = 0x40
NO_REPLY_HEADER: Final = 0x80
NO_UNKNOWN: Final = 0x100
NO_DATA: Final = 0x200
SKIP: Final = 0x400
RCPT_REJECTED: Final = 0x800
NO_REPLY_CONNECT: Final = 0x1000
NO_REPLY_HELO: Final = 0x2000
NO_REPLY_MAIL: Final = 0x4000
NO_REPLY_RCPT: Final = 0x8000
NO_REPLY_DATA: Final = 0x10000
NO_REPLY_UNKNOWN: Final = 0x20000
NO_REPLY_EOH: Final = 0x40000
NO_REPLY_BODY: Final = 0x80000
HEADER_LEADING_SPACE: Final = 0x100000

# Macro stages of the symbol list a filter may request (SMFIM_*).
STAGE_CONNECT: Final = 0
STAGE_HELO: Final = 1
STAGE_MAIL: Final = 2
STAGE_RCPT: Final = 3
STAGE_DATA: Final = 4
STAGE_EOM: Final = 5
STAGE_EOH: Final = 6

# Postfix's body chunks are at most 65535 bytes; libmilter accepts up to 1 MiB when told
# so. Anything larger is not a milter peer.
DEFAULT_MAX_PACKET: Final = 1024 * 1024 + 1024

_LENGTH = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_PORT = struct.Struct(">H")


class MilterProtocolError(Exception):
    """The peer sent something that is not a milter command."""


# --- commands from the MTA ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionNegotiation:
    version: int
    actions: int
    protocol: int


@dataclass(frozen=True, slots=True)
class DefineMacros:
    stage: bytes  # the command the macros belong to: b"C", b"M", b"E", ...
    macros: dict[str, str]


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (unix socket) or "U" (unknown)
    port: int
    address: str


@dataclass(frozen=True, slots=True)
class Helo:
    name: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    sender: str
    arguments: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RcptTo:
    recipient: str
    arguments: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Data:
    pass


@dataclass(frozen=True, slots=True)
class Header:
    name: bytes
    value: bytes  # as sent: folded lines joined by "\n" (Postfix) or "\r\n"


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True, slots=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    data: bytes  # a last body chunk, usually empty


@dataclass(frozen=True, slots=True)
class Abort:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class QuitNewConnection:
    pass


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    command: str


Command = (
    OptionNegotiation | DefineMacros | Connect | Helo | MailFrom | RcptTo | Data | Header
    | EndOfHeaders | BodyChunk | EndOfMessage | Abort | Quit | QuitNewConnection
    | UnknownCommand
)


def _text(data: bytes) -> str:
    # Envelope text may carry 8-bit bytes (SMTPUTF8 or worse); keep them round-trippable.
    return data.decode("utf-8", "surrogateescape")


def _strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings filling `data` exactly."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: missing NUL terminator")
    return data[:-1].split(b"\0")


def _parse_macros(data: bytes) -> DefineMacros:
    if not data:
        raise MilterProtocolError("macro packet without a stage")
    stage, rest = data[:1], data[1:]
    if not rest:
        return DefineMacros(stage, {})
    items = _strings(rest, "macros")
    if len(items) % 2:
        raise MilterProtocolError("macros: a name without a value")
    macros = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        if not name:
            raise MilterProtocolError("macros: empty macro name")
        # Postfix sends `{auth_authen}` and `j` alike; keep the braces off the key.
        key = _text(name)
        if key.startswith("{") and key.endswith("}"):
            key = key[1:-1]
        macros[key] = _text(value)
    return DefineMacros(stage, macros)


def _parse_connect(data: bytes) -> Connect:
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise MilterProtocolError("connect: truncated")
    hostname = _text(data[:end])
    family = chr(data[end + 1])
    if family == "U":
        return Connect(hostname, family, 0, "")
    if family not in "46L":
        raise MilterProtocolError(f"connect: unknown address family {family!r}")
    rest = data[end + 2 :]
    if len(rest) < 3:
        raise MilterProtocolError("connect: truncated address")
    (port,) = _PORT.unpack_from(rest)
    address = _strings(rest[2:], "connect address")
    if len(address) != 1:
        raise MilterProtocolError("connect: trailing data after the address")
    return Connect(hostname, family, port, _text(address[0]))


def _parse_envelope(data: bytes, what: str) -> tuple[str, list[str]]:
    items = _strings(data, what)
    return _text(items[0]), [_text(item) for item in items[1:]]


def _parse_header(data: bytes) -> Header:
    items = _strings(data, "header")
    if len(items) != 2:
        raise MilterProtocolError("header: expected a name and a value")
    name, value = items
    if not name:
        raise MilterProtocolError("header: empty name")
    return Header(name, value)


def parse_command(code: int, data: bytes) -> Command:
    """One packet's command byte and data into a Command (or MilterProtocolError)."""
    if code == 0x42:  # B
        return BodyChunk(data)
    if code == 0x4C:  # L
        return _parse_header(data)
    if code == 0x44:  # D
        return _parse_macros(data)
    if code == 0x45:  # E
        return EndOfMessage(data)
    if code == 0x4E:  # N
        return _check_empty(data, "end of headers", EndOfHeaders())
    if code == 0x4D:  # M
        sender, arguments = _parse_envelope(data, "mail")
        return MailFrom(sender, arguments)
    if code == 0x52:  # R
        recipient, arguments = _parse_envelope(data, "rcpt")
        return RcptTo(recipient, arguments)
    if code == 0x43:  # C
        return _parse_connect(data)
    if code == 0x48:  # H
        items = _strings(data, "helo")
        if len(items) != 1:
            raise MilterProtocolError("helo: trailing data")
        return Helo(_text(items[0]))
    if code == 0x4F:  # O
        if len(data) < _OPTNEG.size:
            raise MilterProtocolError("option negotiation: truncated")
        version, actions, protocol = _OPTNEG.unpack_from(data)
        if version < 2:
            raise MilterProtocolError(f"option negotiation: version {version} is too old")
        return OptionNegotiation(version, actions, protocol)
    if code == 0x54:  # T
        return _check_empty(data, "data", Data())
    if code == 0x41:  # A
        return _check_empty(data, "abort", Abort())
    if code == 0x51:  # Q
        return _check_empty(data, "quit", Quit())
    if code == 0x4B:  # K
        return _check_empty(data, "quit_nc", QuitNewConnection())
    if code == 0x55:  # U
        items = _strings(data, "unknown")
        return UnknownCommand(_text(items[0]))
    raise MilterProtocolError(f"unknown command byte 0x{code:02x}")


def _check_empty(data: bytes, what: str, command: Command) -> Command:
    if data:
        raise MilterProtocolError(f"{what}: unexpected data")
    return command


class MilterDecoder:
    """Accumulates bytes and yields complete commands, with bounded memory."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """True while a packet has started but not ended."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Command]:
        buffer = self._buffer
        buffer += data
        commands: list[Command] = []
        offset = 0
        available = len(buffer)
        while available - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length == 0:
                raise MilterProtocolError("empty packet (no command byte)")
            if length > self.max_packet:
                raise MilterProtocolError(f"packet of {length} bytes exceeds {self.max_packet}")
            end = offset + 4 + length
            if end > available:
                break
            commands.append(parse_command(buffer[offset + 4], bytes(buffer[offset + 5 : end])))
            offset = end
        if offset:
            del buffer[:offset]
        return commands


# --- replies from the filter --------------------------------------------------------------


def packet(code: bytes, data: bytes = b"") -> bytes:
    return _LENGTH.pack(len(data) + 1) + code + data


CONTINUE: Final = packet(b"c")
ACCEPT: Final = packet(b"a")
REJECT: Final = packet(b"r")
TEMPFAIL: Final = packet(b"t")
DISCARD: Final = packet(b"d")
SKIP_REPLY: Final = packet(b"s")
PROGRESS: Final = packet(b"p")


def encode_negotiation_reply(
    version: int, actions: int, protocol: int, macros: dict[int, str] | None = None
) -> bytes:
    """The filter's answer to option negotiation; `macros` asks for a symbol list per stage."""
    data = _OPTNEG.pack(version, actions, protocol)
    for stage, names in (macros or {}).items():
        data += _LENGTH.pack(stage) + names.encode("ascii") + b"\0"
    return packet(b"O", data)


def _clean(text: bytes) -> bytes:
    # A NUL would end the string early on the MTA's side.
    return text.replace(b"\0", b"")


def encode_reply_code(reply: str) -> bytes:
    """A custom SMTP reply (`550 5.7.1 text`), code first; libmilter's `%` rule applies."""
    text = reply.replace("\r", " ").replace("\n", " ").replace("%", "%%")
    if len(text) < 3 or not text[:3].isdigit() or text[0] not in "45":
        raise ValueError(f"not a 4xx or 5xx reply: {reply!r}")
    return packet(b"y", _clean(text.encode("utf-8")) + b"\0")


def encode_add_header(name: bytes, value: bytes) -> bytes:
    return packet(b"h", _clean(name) + b"\0" + _clean(value) + b"\0")


def encode_insert_header(index: int, name: bytes, value: bytes) -> bytes:
    """Insert a header at `index` (0 = above every other header)."""
    return packet(b"i", _LENGTH.pack(index) + _clean(name) + b"\0" + _clean(value) + b"\0")


def encode_change_header(index: int, name: bytes, value: bytes) -> bytes:
    """Change the `index`-th (1-based) header called `name`; an empty value deletes it."""
    return packet(b"m", _LENGTH.pack(index) + _clean(name) + b"\0" + _clean(value) + b"\0")


# --- negotiation ----------------------------------------------------------------------------

# Steps answered without a reply when the MTA offers it, and the reply each step expects.
_NO_REPLY_FLAG = {
    Connect: NO_REPLY_CONNECT,
    Helo: NO_REPLY_HELO,
    MailFrom: NO_REPLY_MAIL,
    RcptTo: NO_REPLY_RCPT,
    Data: NO_REPLY_DATA,
    UnknownCommand: NO_REPLY_UNKNOWN,
    Header: NO_REPLY_HEADER,
    EndOfHeaders: NO_REPLY_EOH,
    BodyChunk: NO_REPLY_BODY,
}


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both sides agreed: the reply to send and which commands want an answer."""

    version: int
    actions: int
    protocol: int
    reply: bytes

    def needs_reply(self, command: Command) -> bool:
        """True when the MTA waits for an answer to `command` (before end of message)."""
        flag = _NO_REPLY_FLAG.get(type(command))
        if flag is None:
            # OptionNegotiation and EndOfMessage are answered by the caller; macros, abort
            # and quit never are.
            return False
        return not self.protocol & flag

    @property
    def header_leading_space(self) -> bool:
        return bool(self.protocol & HEADER_LEADING_SPACE)


def negotiate(
    offer: OptionNegotiation, wanted_actions: int, wanted_protocol: int,
    macros: dict[int, str] | None = None,
) -> Negotiated:
    """Agree on the intersection of what the MTA offers and what the filter wants."""
    version = min(offer.version, PROTOCOL_VERSION)
    actions = offer.actions & wanted_actions
    protocol = offer.protocol & wanted_protocol
    if not offer.actions & ACTION_SET_SYMBOL_LIST or version < 6:
        macros = None
    return Negotiated(
        version, actions, protocol, encode_negotiation_reply(version, actions, protocol, macros)
    )


# --- the MTA's side: commands out, replies in (tests, benchmarks, probes) -------------------


def encode_negotiation(
    version: int = PROTOCOL_VERSION, actions: int = 0x1FF, protocol: int = 0x1FFFFF
) -> bytes:
    return packet(b"O", _OPTNEG.pack(version, actions, protocol))


def encode_macros(stage: bytes, macros: dict[str, str]) -> bytes:
    data = b"".join(
        (f"{{{k}}}" if len(k) > 1 else k).encode() + b"\0" + v.encode() + b"\0"
        for k, v in macros.items()
    )
    return packet(b"D", stage + data)


def encode_connect(hostname: str, family: str, port: int, address: str) -> bytes:
    data = hostname.encode() + b"\0" + family.encode()
    if family != "U":
        data += _PORT.pack(port) + address.encode() + b"\0"
    return packet(b"C", data)


def encode_helo(name: str) -> bytes:
    return packet(b"H", name.encode() + b"\0")


def encode_mail(sender: str, *arguments: str) -> bytes:
    return packet(b"M", b"".join(a.encode() + b"\0" for a in (sender, *arguments)))


def encode_rcpt(recipient: str, *arguments: str) -> bytes:
    return packet(b"R", b"".join(a.encode() + b"\0" for a in (recipient, *arguments)))


def encode_header(name: bytes, value: bytes) -> bytes:
    return packet(b"L", name + b"\0" + value + b"\0")


def encode_body(chunk: bytes) -> bytes:
    return packet(b"B", chunk)


DATA: Final = packet(b"T")
END_OF_HEADERS: Final = packet(b"N")
END_OF_MESSAGE: Final = packet(b"E")
ABORT: Final = packet(b"A")
QUIT: Final = packet(b"Q")
QUIT_NEW_CONNECTION: Final = packet(b"K")


@dataclass(frozen=True, slots=True)
class Reply:
    """One packet from the filter: its code letter and parsed fields."""

    code: str
    data: bytes
    index: int = 0
    name: bytes = b""
    value: bytes = b""
    negotiation: OptionNegotiation | None = None

    @property
    def final(self) -> bool:
        """True for the answers that end a step (continue, accept, reject, ...)."""
        return self.code in "acdrtsy"


class ReplyDecoder:
    """The MTA's side: bytes from the filter into Replies."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies = []
        while len(self._buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0 or length > self.max_packet:
                raise MilterProtocolError(f"bad reply length {length}")
            if len(self._buffer) < 4 + length:
                break
            code = chr(self._buffer[4])
            data = bytes(self._buffer[5 : 4 + length])
            del self._buffer[: 4 + length]
            replies.append(_parse_reply(code, data))
        return replies


def _name_value(data: bytes, code: str) -> tuple[bytes, bytes]:
    items = _strings(data, code)
    if len(items) != 2:
        raise MilterProtocolError(f"{code}: expected a name and a value")
    return items[0], items[1]


def _parse_reply(code: str, data: bytes) -> Reply:
    if code == "O":
        if len(data) < _OPTNEG.size:
            raise MilterProtocolError("negotiation reply: truncated")
        return Reply(code, data, negotiation=OptionNegotiation(*_OPTNEG.unpack_from(data)))
    if code in "im":
        if len(data) < 4:
            raise MilterProtocolError(f"{code}: truncated")
        (index,) = _LENGTH.unpack_from(data)
        name, value = _name_value(data[4:], code)
        return Reply(code, data, index=index, name=name, value=value)
    if code == "h":
        name, value = _name_value(data, code)
        return Reply(code, data, name=name, value=value)
    if code == "y":
        return Reply(code, data, value=_strings(data, code)[0])
    return Reply(code, data)


async def probe(address: str, timeout: float = 5.0) -> str:
    """Option negotiation, as Postfix opens every milter session; then QUIT."""
    target = parse_host_port(address)
    decoder = ReplyDecoder()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(encode_negotiation())
            replies: list[Reply] = []
            while not replies:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("milter closed the connection")
                replies = decoder.feed(data)
            writer.write(QUIT)
            await writer.drain()
        except MilterProtocolError as error:
            raise ConnectionError(f"milter answered garbage: {error}") from None
        finally:
            writer.close()
    negotiation = replies[0].negotiation
    if negotiation is None:
        raise ConnectionError(f"milter answered {replies[0].code!r} to option negotiation")
    return (f"milter v{negotiation.version} actions=0x{negotiation.actions:x} "
            f"protocol=0x{negotiation.protocol:x}")

