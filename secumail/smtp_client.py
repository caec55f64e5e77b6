"""A small asyncio SMTP client: what a filter needs to hand a message to its next hop.

It gives back every reply as it came (code and text), so that the relay can pass the next
hop's answers upstream unchanged. Any socket trouble raises `SmtpUnavailable`, which the
relay turns into a 451: the message stays in Postfix's queue.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from secumail.logs import describe
from secumail.message import dot_stuffed
from secumail.netaddr import HostPort
from secumail.runtime import IdleDeadline, send

MAX_REPLY_LINES = 100


class SmtpUnavailable(Exception):
    """The next hop could not be reached, or broke off, or did not answer in time."""


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


class NextHop:
    """`host:port` of the next hop. A name with several addresses (a scaled compose service)
    is spread over them in turn; a connection failure moves on to the next address."""

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self._turn = itertools.count()

    async def addresses(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.address.host, self.address.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            raise SmtpUnavailable(f"cannot resolve {self.address}: {error}") from None
        found = list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))
        start = next(self._turn) % len(found)
        return found[start:] + found[:start]


class SmtpClient:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.peer = ""
        self.opened = 0.0  # time.monotonic() of the connection, for reuse limits
        self.in_transaction = False  # MAIL accepted, and neither end of DATA nor RSET since
        self._awaiting_reply = False  # sent something whose reply is not read yet
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # One timer per connection bounds each wait for the next hop's replies: cheaper
        # than asyncio.timeout() around every command (a tenth of a filter's own time).
        self._deadline: IdleDeadline | None = None

    async def connect(self, next_hop: NextHop, helo_name: str) -> SmtpReply:
        """Connect to the first address of `next_hop` that answers, then EHLO."""
        errors = []
        for host, port in await next_hop.addresses():
            try:
                async with asyncio.timeout(self.timeout):
                    self._reader, self._writer = await asyncio.open_connection(host, port)
                    banner = await self._read_reply()
            except (OSError, TimeoutError, SmtpUnavailable) as error:
                errors.append(f"{host}:{port}: {describe(error)}")
                await self.close()
                continue
            self.peer = f"{host}:{port}"
            self.opened = time.monotonic()
            assert self._writer is not None
            self._deadline = IdleDeadline(self._writer, self.timeout)
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

    async def data(self, message: bytes | list[bytes | memoryview]) -> SmtpReply:
        """DATA, the dot-stuffed message (CRLF line endings only; or its pieces, each
        starting at a line start), and the final dot."""
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        pieces: list[bytes | memoryview] = [message] if isinstance(message, bytes) else message
        try:
            [reply] = await self._exchange(dot_stuffed(pieces), 1)
        except SmtpUnavailable as error:
            raise SmtpUnavailable(f"end of data: {error}") from None
        self.in_transaction = False  # whatever the code, the end-of-data reply ends it
        return reply

    async def _exchange(self, data: bytes | Iterable[bytes], replies: int) -> list[SmtpReply]:
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
            read = [await self._read_reply() for _ in range(replies)]
            self._awaiting_reply = False
            return read
        except (OSError, SmtpUnavailable) as error:
            # The deadline closes the connection: the read then ends as if the peer had.
            await self.close()
            raise SmtpUnavailable(describe(TimeoutError() if deadline.expired else error)) from None
        finally:
            deadline.busy()

    async def _read_reply(self) -> SmtpReply:
        assert self._reader is not None
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            raw = await self._reader.readline()
            if not raw.endswith(b"\n"):
                raise SmtpUnavailable("connection closed by the next hop")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            code, separator = text[:3], text[3:4]
            if not code.isdigit() or separator not in ("", " ", "-"):
                raise SmtpUnavailable(f"malformed reply {text[:80]!r}")
            lines.append(text[4:])
            if separator != "-":
                return SmtpReply(int(code), tuple(lines))
        raise SmtpUnavailable("reply too long")

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
