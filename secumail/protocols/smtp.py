"""SMTP, as SecuMail speaks it: the codec, the client, and the probes.

- The codec, sans I/O: `ReplyDecoder` turns the bytes a server sends into replies;
  `DotDecoder` reads the DATA stream (transparency dots removed, RFC 5321 4.5.2) and
  `dot_stuffed` writes one, from a message's pieces, with no whole copy of a big message.
- The client: `SmtpClient`, what a filter needs to hand a message to its next hop in
  lockstep (MAIL and each RCPT passed on as they come), and `deliver()`, the whole
  transaction at once, which the gateway's quarantine release and chain canary use. Every
  reply comes back as it came (code and text), so that the relay can pass the next hop's
  answers upstream unchanged. Any socket trouble raises `SmtpUnavailable`, which the relay
  turns into a 451: the message stays in Postfix's queue.
- The probes: a banner, or a banner and EHLO, as healthchecks and the gateway ask.

The server side is aiosmtpd's, extended in secumail/filter/aiosmtpd_adapter.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from secumail.connections import IdleDeadline, send
from secumail.limits import READ_SIZE, SMTP_REPLY_LINE, SMTP_REPLY_LINES
from secumail.logs import describe, log_event
from secumail.netaddr import HostPort, parse_host_port, resolve

log = logging.getLogger("secumail.smtp")

XFORWARD_NAMES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
# The MAIL and RCPT parameters a filter takes and passes on (RFC 6152, 6531, 1870, 3461):
# a relay that refused Postfix's DSN parameters would refuse every message that asks for one.
MAIL_PARAMETERS = frozenset({"BODY", "SMTPUTF8", "SIZE", "RET", "ENVID"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
# Which extension the next hop must announce to be sent each parameter.
_NEEDS = {"BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "SIZE": "SIZE", "RET": "DSN",
          "ENVID": "DSN", "NOTIFY": "DSN", "ORCPT": "DSN"}
_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})+$")  # RFC 3461 4: no "+" or "=" bare


def parameter_problem(parameters: list[str], known: frozenset[str],
                      size_limit: int | None = None) -> str | None:
    """The reply refusing MAIL or RCPT parameters, or None when each is one `known` and
    well-formed. Values keep their case (ENVID and ORCPT are the client's own text)."""
    for parameter in parameters:
        name, equals, value = parameter.partition("=")
        key = name.upper()
        if not name.isalnum() or (equals and not value):
            return "501 5.5.4 Syntax error in parameters"
        if key not in known:
            return f"555 5.5.4 {name[:20]} parameter not recognized or not implemented"
        valid = {
            "BODY": value.upper() in ("7BIT", "8BITMIME"),
            "SMTPUTF8": not equals,
            "SIZE": value.isdigit(),
            "RET": value.upper() in ("FULL", "HDRS"),
            "ENVID": bool(_XTEXT.match(value)) and len(value) <= 100,
            "NOTIFY": all(v in ("NEVER", "SUCCESS", "FAILURE", "DELAY")
                          for v in value.upper().split(",")),
            "ORCPT": ";" in value and bool(_XTEXT.match(value.partition(";")[2])),
        }[key]
        if not valid:
            return f"501 5.5.4 Bad {key} parameter"
        if key == "SIZE" and size_limit and int(value) > size_limit:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
    return None


class SmtpUnavailable(Exception):
    """The next hop could not be reached, or broke off, or did not answer in time."""


class SmtpRefused(Exception):
    """A step of `deliver()` was refused: `step` (MAIL, RCPT <address>, DATA) and the reply."""

    def __init__(self, step: str, reply: SmtpReply) -> None:
        super().__init__(f"{step}: {reply}")
        self.step = step
        self.reply = reply


# --- the codec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpReply:
    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        """The reply as one SMTP response, ready to send upstream (multi-line kept)."""
        last = len(self.lines) - 1
        return "\r\n".join(
            f"{self.code}{' ' if i == last else '-'}{line}" for i, line in enumerate(self.lines)
        )


class ReplyDecoder:
    """Replies from what a server sends, in any chunking. Anything that is not an SMTP
    reply (no three-digit code, a line or a reply too long) raises SmtpUnavailable."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[SmtpReply]:
        self._buffer += data
        replies = []
        while (end := self._buffer.find(b"\n")) >= 0:
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            text = raw.decode("utf-8", "replace").rstrip("\r")
            code, separator = text[:3], text[3:4]
            if not code.isdigit() or separator not in ("", " ", "-"):
                raise SmtpUnavailable(f"malformed reply {text[:80]!r}")
            self._lines.append(text[4:])
            if separator != "-":
                replies.append(SmtpReply(int(code), tuple(self._lines)))
                self._lines = []
            elif len(self._lines) >= SMTP_REPLY_LINES:
                raise SmtpUnavailable("reply too long")
        if len(self._buffer) > SMTP_REPLY_LINE:
            raise SmtpUnavailable("reply line too long")
        return replies


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


# --- the client ---------------------------------------------------------------------------


class NextHop:
    """`host:port` of the next hop. A name with several addresses (a scaled compose service)
    is spread over them in turn; a connection failure moves on to the next address."""

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self._turn = itertools.count()

    async def addresses(self) -> list[tuple[str, int]]:
        try:
            found = await resolve(self.address)
        except OSError as error:
            raise SmtpUnavailable(f"cannot resolve {self.address}: {error}") from None
        start = next(self._turn) % len(found)
        return found[start:] + found[:start]


@dataclass(frozen=True)
class Envelope:
    """One transaction's envelope, the one shape it has from a filter's MAIL to its next
    hop, the quarantine, tracking and a release: the addresses without angle brackets, ""
    for the null sender; the client's attributes as Postfix passed them with XFORWARD
    (ADDR, NAME, HELO, IDENT...), passed on the same way."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    client: dict[str, str] = field(default_factory=dict)
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[tuple[str, ...], ...] = ()  # each recipient's, when it has any

    def with_recipient(self, recipient: str, options: Iterable[str]) -> Envelope:
        return replace(self, rcpt_tos=(*self.rcpt_tos, recipient),
                       rcpt_options=(*self.rcpt_options, tuple(options)))

    def recipients(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Each recipient with its RCPT options (none when the envelope was made without)."""
        for index, recipient in enumerate(self.rcpt_tos):
            yield recipient, self.rcpt_options[index] if index < len(self.rcpt_options) else ()


class SmtpClient:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.peer = ""
        self.opened = 0.0  # time.monotonic() of the connection, for reuse limits
        self.in_transaction = False  # MAIL accepted, and neither end of DATA nor RSET since
        self._awaiting_reply = False  # sent something whose reply is not read yet
        # The final dot is sent and its reply not read: the next hop has the message (it
        # queues what ended with a dot, whether or not its reply is read).
        self.delivered_unanswered = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = ReplyDecoder()
        self._replies: list[SmtpReply] = []
        # One timer per connection bounds each wait for the next hop's replies: cheaper
        # than asyncio.timeout() around every command (a tenth of a filter's own time).
        self._deadline: IdleDeadline | None = None

    async def open(self, host: str, port: int) -> SmtpReply:
        """Connect and read the greeting (no EHLO)."""
        async with asyncio.timeout(self.timeout):
            self._reader, self._writer = await asyncio.open_connection(host, port)
            banner = await self._read_reply()
        self.peer = f"{host}:{port}"
        self.opened = time.monotonic()
        self._deadline = IdleDeadline(self._writer, self.timeout)
        return banner

    async def connect(self, next_hop: NextHop, helo_name: str) -> SmtpReply:
        """Connect to the first address of `next_hop` that answers, then EHLO."""
        errors = []
        for host, port in await next_hop.addresses():
            try:
                banner = await self.open(host, port)
            except (OSError, TimeoutError, SmtpUnavailable) as error:
                errors.append(f"{host}:{port}: {describe(error)}")
                await self.close()
                continue
            if banner.code != 220:
                return banner
            return await self.ehlo(helo_name)
        raise SmtpUnavailable("no next hop answered: " + "; ".join(errors))

    async def ehlo(self, name: str) -> SmtpReply:
        reply = await self.command(f"EHLO {name}")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
        return reply

    async def command(self, line: str) -> SmtpReply:
        return (await self.pipeline([line]))[-1]

    async def pipeline(self, lines: list[str]) -> list[SmtpReply]:
        """Send `lines` in one write (RFC 2920 PIPELINING) and read one reply for each."""
        if self._writer is None or self._deadline is None:
            raise SmtpUnavailable("not connected")
        data = b"".join(line.encode("utf-8", "surrogateescape") + b"\r\n" for line in lines)
        try:
            replies = await self._exchange(data, len(lines))
        except SmtpUnavailable as error:
            verb = lines[-1].split(" ", 1)[0]
            raise SmtpUnavailable(f"{verb}: {error}") from None
        verb = lines[-1][:4].upper()
        if verb == "MAIL" and replies[-1].ok:
            self.in_transaction = True
        elif verb == "RSET":
            self.in_transaction = not replies[-1].ok
        return replies

    def passable(self, parameters: Iterable[str]) -> list[str]:
        """The MAIL or RCPT parameters the next hop announced it takes."""
        return [p for p in parameters
                if _NEEDS.get(p.partition("=")[0].upper(), "") in self.extensions]

    async def mail(self, sender: str, options: Iterable[str] = (),
                   xforward: dict[str, str] | None = None) -> SmtpReply:
        """XFORWARD (the attributes the next hop takes) and MAIL with the parameters it
        takes, in one write when it allows pipelining; MAIL's reply."""
        mail = " ".join([f"MAIL FROM:<{sender}>", *self.passable(options)])
        supported = set(self.extensions.get("XFORWARD", "").upper().split())
        items = [f"{k}={v}" for k, v in (xforward or {}).items() if k in supported and v]
        if not items:
            return await self.command(mail)
        lines = ["XFORWARD " + " ".join(items), mail]
        if "PIPELINING" in self.extensions:
            replies = await self.pipeline(lines)
        else:
            replies = [await self.command(line) for line in lines]
        if not replies[0].ok:
            log_event(log, "next hop refused XFORWARD", logging.WARNING, peer=self.peer,
                      reply=str(replies[0])[:200])
        return replies[-1]

    async def rcpt(self, recipient: str, options: Iterable[str] = ()) -> SmtpReply:
        return await self.command(" ".join([f"RCPT TO:<{recipient}>",
                                            *self.passable(options)]))

    async def data(self, message: bytes | list[bytes | memoryview]) -> SmtpReply:
        """DATA, the dot-stuffed message (CRLF line endings only; or its pieces, each
        starting at a line start), and the final dot."""
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        pieces: list[bytes | memoryview] = [message] if isinstance(message, bytes) else message
        try:
            [reply] = await self._exchange(dot_stuffed(pieces), 1, final_dot=True)
        except SmtpUnavailable as error:
            raise SmtpUnavailable(f"end of data: {error}") from None
        self.in_transaction = False  # whatever the code, the end-of-data reply ends it
        return reply

    async def late_reply(self) -> SmtpReply | None:
        """The end-of-data reply a cancelled data() left to come (its caller's client left):
        read within the timeout, then the connection is closed. None if none came."""
        try:
            async with asyncio.timeout(self.timeout):
                reply: SmtpReply | None = await self._read_reply()
        except (OSError, SmtpUnavailable, TimeoutError):
            reply = None
        finally:
            await self.close()
        return reply

    async def _exchange(self, data: bytes | Iterable[bytes], replies: int,
                        final_dot: bool = False) -> list[SmtpReply]:
        """Send `data` (or its pieces, one after the other), read `replies` replies within
        the timeout; any trouble closes the connection and raises SmtpUnavailable saying
        what it was."""
        assert self._writer is not None and self._deadline is not None
        deadline = self._deadline
        deadline.waiting()
        try:
            self._awaiting_reply = True
            for piece in [data] if isinstance(data, bytes) else data:
                await send(self._writer, piece)
            self.delivered_unanswered = final_dot
            read = [await self._read_reply() for _ in range(replies)]
            self._awaiting_reply = self.delivered_unanswered = False
            return read
        except (OSError, SmtpUnavailable) as error:
            # The deadline closes the connection: the read then ends as if the peer had.
            await self.close()
            raise SmtpUnavailable(describe(TimeoutError() if deadline.expired else error)) from None
        finally:
            deadline.busy()

    async def _read_reply(self) -> SmtpReply:
        assert self._reader is not None
        while not self._replies:
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise SmtpUnavailable("connection closed by the next hop")
            self._replies = self._decoder.feed(data)
        return self._replies.pop(0)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def reusable(self) -> bool:
        """Between transactions with every reply read: fit to carry another session's mail.
        (A session that ended in the middle of a command leaves its reply still to come.)"""
        return self.connected and not self.in_transaction and not self._awaiting_reply

    async def quit(self) -> None:
        if self.connected and not self._awaiting_reply:
            try:
                await self.command("QUIT")
            except SmtpUnavailable:
                pass
        await self.close()

    async def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None
        self._decoder, self._replies = ReplyDecoder(), []


async def deliver(next_hop: NextHop, helo: str, envelope: Envelope,
                  message: bytes | list[bytes | memoryview], timeout: float) -> SmtpReply:
    """One whole transaction on a connection of its own: the next hop's answer to the end
    of DATA. All or nothing: a refused greeting, MAIL or any RCPT raises SmtpRefused (a
    partial delivery would be confusing); SmtpUnavailable when the next hop cannot be had."""
    client = SmtpClient(timeout)
    try:
        steps = [("EHLO", await client.connect(next_hop, helo))]
        steps.append(("MAIL", await client.mail(envelope.mail_from, envelope.mail_options,
                                                envelope.client)))
        for step, reply in steps:
            if not reply.ok:
                raise SmtpRefused(step, reply)
        for recipient, options in envelope.recipients():
            reply = await client.rcpt(recipient, options)
            if not reply.ok:
                raise SmtpRefused(f"RCPT {recipient}", reply)
        return await client.data(message)
    finally:
        await client.quit()


# --- probes -------------------------------------------------------------------------------


async def _greeted(address: str, timeout: float, ehlo: bool) -> str:
    """A 220 greeting (and a 250 to EHLO, if asked), then QUIT: the greeting's last line."""
    target = parse_host_port(address)
    client = SmtpClient(timeout)
    try:
        banner = await client.open(target.host, target.port)
        if banner.code != 220:
            raise ConnectionError(f"banner {str(banner)[:80]!r}")
        if ehlo and (reply := await client.ehlo("probe.secumail")).code != 250:
            raise ConnectionError(f"EHLO answered {str(reply)[:80]!r}")
        return str(banner).splitlines()[-1]
    finally:
        await client.quit()


async def banner_probe(address: str, timeout: float = 5.0) -> str:
    """What a client sees first (no EHLO, so no log noise)."""
    return await _greeted(address, timeout, ehlo=False)


async def ehlo_probe(address: str, timeout: float = 5.0) -> str:
    """EHLO answered with 250."""
    return await _greeted(address, timeout, ehlo=True)
