"""The SPAMC/SPAMD protocol (spamd(1)): one request per connection, score and rules back."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from secumail.backend import BackendError, open_backend, ping
from secumail.logs import describe

MAX_REPLY = 64 * 1024
_SPAM_LINE = re.compile(r"^Spam:\s*(\w+)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)\s*$", re.I | re.M)


@dataclass(frozen=True)
class SpamResult:
    score: float
    symbols: tuple[str, ...]


def build_request(message: bytes, user: str = "secumail") -> bytes:
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(message)}\r\nUser: {user}\r\n\r\n"
    return head.encode() + message


def parse_reply(reply: bytes) -> SpamResult:
    """`SPAMD/1.1 0 EX_OK` + `Spam: True ; 15.0 / 5.0` + the rules that hit."""
    head, _, body = reply.partition(b"\r\n\r\n")
    text = head.decode("utf-8", "replace")
    status = text.split("\r\n", 1)[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/") or status[1] != "0":
        raise BackendError(f"spamd answered {text[:200]!r}")
    found = _SPAM_LINE.search(text)
    if found is None:
        raise BackendError("spamd answer has no Spam: line")
    symbols = tuple(s for s in body.decode("ascii", "replace").strip().split(",") if s)
    return SpamResult(float(found.group(2)), symbols)


async def check(address: str, message: bytes, timeout: float) -> SpamResult:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_backend(address)
            try:
                writer.write(build_request(message))
                await writer.drain()
                writer.write_eof()  # spamd reads to the end of the request
                reply = await reader.read(MAX_REPLY)
                while chunk := await reader.read(MAX_REPLY):
                    reply += chunk
                    if len(reply) > MAX_REPLY:
                        raise BackendError("spamd answer too long")
            finally:
                writer.close()
    except (OSError, TimeoutError) as error:
        raise BackendError(f"spamd at {address}: {describe(error)}") from None
    return parse_reply(reply)


async def probe(address: str, timeout: float = 5.0) -> str:
    """PING, answered PONG by a healthy spamd."""
    return await ping(address, b"PING SPAMC/1.5\r\n\r\n", timeout)
