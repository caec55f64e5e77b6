"""Probes of every hop of the chain: container healthchecks and the gateway use them.

Each probe opens a real session with the service and checks the answer a healthy one
gives: an SMTP banner or EHLO, a policy answer, clamd's and spamd's PONG.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from secumail.backend import open_backend
from secumail.netaddr import parse_host_port
from secumail.policy_codec import encode_request


async def smtp_ehlo(address: str, timeout: float = 5.0) -> str:
    """EHLO answered with 250; returns the banner line."""
    target = parse_host_port(address)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            banner = (await reader.readline()).decode(errors="replace").strip()
            if not banner.startswith("220"):
                raise ConnectionError(f"banner {banner[:80]!r}")
            writer.write(b"EHLO probe.secumail\r\n")
            while True:
                line = (await reader.readline()).decode(errors="replace")
                if not line.startswith("250"):
                    raise ConnectionError(f"EHLO answered {line.strip()[:80]!r}")
                if line[3:4] == " ":
                    break
            writer.write(b"QUIT\r\n")
        finally:
            writer.close()
    return banner


async def policy(address: str, timeout: float = 5.0) -> str:
    """A request at a stage no check acts on: a healthy service answers DUNNO."""
    target = parse_host_port(address)
    request = encode_request({"request": "smtpd_access_policy", "protocol_state": "VRFY"})
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(request)
            answer = (await reader.readuntil(b"\n\n")).decode(errors="replace").strip()
        finally:
            writer.close()
    if not answer.startswith("action="):
        raise ConnectionError(f"policy answered {answer[:80]!r}")
    return answer


async def _ping(address: str, request: bytes, expected: bytes, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        reader, writer = await open_backend(address)
        try:
            writer.write(request)
            answer = await reader.read(200)
        finally:
            writer.close()
    if expected not in answer:
        raise ConnectionError(f"answered {answer[:80]!r}")
    return answer.decode(errors="replace").strip("\0\r\n ")


async def clamd(address: str, timeout: float = 5.0) -> str:
    return await _ping(address, b"zPING\0", b"PONG", timeout)


async def spamd(address: str, timeout: float = 5.0) -> str:
    return await _ping(address, b"PING SPAMC/1.5\r\n\r\n", b"PONG", timeout)


PROBES = {"smtp": smtp_ehlo, "policy": policy, "clamd": clamd, "spamd": spamd}


def main() -> None:
    """`secumail-probe KIND ADDRESS`: exit 0 when healthy (for container HEALTHCHECKs)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(PROBES))
    parser.add_argument("address")
    args = parser.parse_args()
    try:
        print(asyncio.run(PROBES[args.kind](args.address)))
    except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as error:
        print(f"unhealthy: {error or type(error).__name__}", file=sys.stderr)
        raise SystemExit(1) from None
