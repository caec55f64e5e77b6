"""The SPAMC/SPAMD protocol (spamd(1)): one request per connection, score and rules back."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

from secumail.backend import BackendError, open_backend, ping
from secumail.limits import SPAMD_REPLY
from secumail.logs import describe

Kind = Literal["spam", "ham"]  # what TELL teaches a message is (its Message-class)
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


def build_tell(message: bytes, kind: Kind, user: str = "secumail") -> bytes:
    """TELL: learn the message as spam or ham into the local Bayes database (spamd must run
    with --allow-tell). A message learned as the other kind before is relearned."""
    head = (f"TELL SPAMC/1.5\r\nContent-length: {len(message)}\r\nMessage-class: {kind}\r\n"
            f"Set: local\r\nUser: {user}\r\n\r\n")
    return head.encode() + message


def parse_tell_reply(reply: bytes) -> bool:
    """Whether spamd learned the message (`DidSet: local`), or knew it already (no DidSet)."""
    text = reply.partition(b"\r\n\r\n")[0].decode("utf-8", "replace")
    status = text.split("\r\n", 1)[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/") or status[1] != "0":
        raise BackendError(f"spamd refused to learn: {text[:200]!r}")
    return bool(re.search(r"^DidSet:.*\blocal\b", text, re.I | re.M))


async def _exchange(address: str, request: bytes, timeout: float) -> bytes:
    """One request, its whole answer (spamd answers one request per connection)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_backend(address)
            try:
                writer.write(request)
                await writer.drain()
                writer.write_eof()  # spamd reads to the end of the request
                reply = await reader.read(SPAMD_REPLY)
                while chunk := await reader.read(SPAMD_REPLY):
                    reply += chunk
                    if len(reply) > SPAMD_REPLY:
                        raise BackendError("spamd answer too long")
            finally:
                writer.close()
    except (OSError, TimeoutError) as error:
        raise BackendError(f"spamd at {address}: {describe(error)}") from None
    return reply


async def check(address: str, message: bytes, timeout: float) -> SpamResult:
    return parse_reply(await _exchange(address, build_request(message), timeout))


async def learn(address: str, message: bytes, kind: Kind, timeout: float) -> bool:
    """Teach spamd's Bayes database that this message is spam or ham: True when learned,
    False when it knew it already as that kind. BackendError when spamd cannot learn."""
    return parse_tell_reply(await _exchange(address, build_tell(message, kind), timeout))


async def probe(address: str, timeout: float = 5.0) -> str:
    """PING, answered PONG by a healthy spamd."""
    return await ping(address, b"PING SPAMC/1.5\r\n\r\n", timeout)
