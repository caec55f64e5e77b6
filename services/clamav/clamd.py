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
                writer.write(b"zINSTREAM\0")
                for start in range(0, len(message), CHUNK):
                    chunk = message[start : start + CHUNK]
                    writer.write(struct.pack(">I", len(chunk)) + chunk)
                    await writer.drain()
                writer.write(struct.pack(">I", 0))
                await writer.drain()
                reply = await reader.readuntil(b"\0")
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        raise BackendError(f"clamd at {address}: {error or type(error).__name__}") from None
    return parse_reply(reply)
