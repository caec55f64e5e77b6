"""clamd's INSTREAM protocol (clamd(8)): the message in length-prefixed chunks, one reply."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from secumail.backend import BackendError, open_backend

CHUNK = 64 * 1024


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
    chunks = (message[start : start + CHUNK] for start in range(0, len(message), CHUNK))
    framed = b"".join(struct.pack(">I", len(chunk)) + chunk for chunk in chunks)
    return b"zINSTREAM\0" + framed + struct.pack(">I", 0)


async def scan(address: str, message: bytes, timeout: float, max_length: int) -> ScanResult:
    """Scan `message` with clamd; BackendError when no verdict could be had."""
    if len(message) > max_length:
        raise BackendError(
            f"message of {len(message)} bytes exceeds clamd's StreamMaxLength ({max_length})"
        )
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_backend(address)
            try:
                writer.write(instream_request(message))  # one write: one system call
                await writer.drain()
                reply = await reader.readuntil(b"\0")
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        raise BackendError(f"clamd at {address}: {error or type(error).__name__}") from None
    return parse_reply(reply)
