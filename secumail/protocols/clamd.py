"""clamd's INSTREAM protocol (clamd(8)): the message in length-prefixed chunks, one reply,
over kept IDSESSION connections."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from secumail.backend import BackendError, open_backend, ping
from secumail.kept import KeptConnections
from secumail.limits import (
    CLAMD_CHUNK,
    CLAMD_ONE_WRITE,
    CLAMD_SESSION_IDLE,
    CLAMD_SESSIONS_KEPT,
)
from secumail.logs import describe


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    signature: str = ""  # the virus name when infected


def parse_reply(reply: bytes) -> ScanResult:
    """`stream: OK`, `stream: Eicar-Signature FOUND`, or an error (raises BackendError)."""
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace")
    _, _, verdict = text.partition(": ")
    if verdict == "OK":
        return ScanResult(False)
    if verdict.endswith(" FOUND"):
        return ScanResult(True, verdict.removesuffix(" FOUND").strip())
    raise BackendError(f"clamd answered {text[:200]!r}")


def instream_request(message: bytes) -> bytes:
    """zINSTREAM, the message in length-prefixed chunks, and the zero length that ends it."""
    chunks = (message[start : start + CLAMD_CHUNK]
              for start in range(0, len(message), CLAMD_CHUNK))
    framed = b"".join(struct.pack(">I", len(chunk)) + chunk for chunk in chunks)
    return b"zINSTREAM\0" + framed + struct.pack(">I", 0)


class Clamd:
    """clamd at `address`, over connections kept from one scan to the next (clamd's
    IDSESSION): a new connection per message cost as much as scanning a small one. Each
    connection carries one scan at a time; one clamd closed meanwhile is replaced."""

    def __init__(self, address: str, timeout: float, max_length: int) -> None:
        self.address = address
        self.timeout = timeout
        self.max_length = max_length
        self.kept = KeptConnections[_Session](CLAMD_SESSION_IDLE, CLAMD_SESSIONS_KEPT,
                                              _Session.close)

    async def scan(self, message: bytes) -> ScanResult:
        """Scan `message`; BackendError when no verdict could be had."""
        if len(message) > self.max_length:
            raise BackendError(f"message of {len(message)} bytes exceeds clamd's "
                               f"StreamMaxLength ({self.max_length})")
        while True:
            session = self.kept.take()
            kept = session is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if session is None:
                        session = await _Session.open(self.address)
                    result = parse_reply(await session.instream(message))
            except (OSError, asyncio.IncompleteReadError) as error:
                if session is not None:
                    session.close()
                if kept:
                    continue  # clamd closed the kept connection (idle, restarted): a new one
                raise BackendError(self._failed(error)) from None
            except BaseException as error:  # timed out, cancelled, clamd answered an error
                if session is not None:
                    session.close()  # a reply may still be on its way: never reused
                if isinstance(error, (TimeoutError, asyncio.LimitOverrunError)):
                    raise BackendError(self._failed(error)) from None
                raise
            self.kept.keep(session)
            return result

    def close(self) -> None:
        self.kept.close_all()

    def _failed(self, error: Exception) -> str:
        return f"clamd at {self.address}: {describe(error)}"


class _Session:
    """One IDSESSION connection: replies come back as `<request number>: <reply>`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.requests = 0

    @classmethod
    async def open(cls, address: str) -> _Session:
        reader, writer = await open_backend(address)
        writer.write(b"zIDSESSION\0")  # no reply of its own
        return cls(reader, writer)

    async def instream(self, message: bytes) -> bytes:
        self.requests += 1
        if len(message) <= CLAMD_ONE_WRITE:
            self.writer.write(instream_request(message))  # one write: one system call
        else:  # chunk by chunk from a view: no framed copy of a big message
            view = memoryview(message)
            self.writer.write(b"zINSTREAM\0")
            for start in range(0, len(message), CLAMD_CHUNK):
                chunk = view[start:start + CLAMD_CHUNK]
                self.writer.write(struct.pack(">I", len(chunk)))
                self.writer.write(chunk)
                await self.writer.drain()
            self.writer.write(struct.pack(">I", 0))
        await self.writer.drain()
        reply = await self.reader.readuntil(b"\0")
        number, separator, rest = reply.partition(b": ")
        if number != str(self.requests).encode() or not separator:
            # e.g. what clamd said on ending an idle session: this connection is done
            raise ConnectionError(f"clamd answered out of turn: {reply[:200]!r}")
        return rest

    def close(self) -> None:
        self.writer.close()


async def probe(address: str, timeout: float = 5.0) -> str:
    """PING, answered PONG by a healthy clamd."""
    return await ping(address, b"zPING\0", timeout)
