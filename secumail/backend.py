"""Connections to the scanning daemons (clamd, spamd): TCP `host:port` or a unix socket path."""

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
