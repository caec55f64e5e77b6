"""Connections to the scanning daemons (clamd, spamd): TCP `host:port` or a unix socket path,
and the PING both answer PONG to (their probes)."""

from __future__ import annotations

import asyncio

from secumail.netaddr import parse_host_port


async def open_backend(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("/"):
        return await asyncio.open_unix_connection(address, limit=1 << 20)
    target = parse_host_port(address)
    return await asyncio.open_connection(target.host, target.port, limit=1 << 20)


class BackendError(Exception):
    """The scanner could not give a verdict (unreachable, timed out, answered an error)."""


async def ping(address: str, request: bytes, timeout: float) -> str:
    """Send `request`; a healthy scanner answers PONG."""
    async with asyncio.timeout(timeout):
        reader, writer = await open_backend(address)
        try:
            writer.write(request)
            answer = await reader.read(200)
        finally:
            writer.close()
    if b"PONG" not in answer:
        raise ConnectionError(f"answered {answer[:80]!r}")
    return answer.decode(errors="replace").strip("\0\r\n ")

