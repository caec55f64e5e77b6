"""Probes of every hop of the chain: container healthchecks and the gateway use them.

Each probe opens a real session with the service and checks the answer a healthy one
gives: an SMTP banner or EHLO, a policy answer, clamd's and spamd's PONG, a milter's
option negotiation. `replicas` turns a compose service name into every replica's address.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from secumail import milter_codec
from secumail.backend import open_backend
from secumail.logs import describe
from secumail.netaddr import HostPort, parse_host_port
from secumail.policy_codec import encode_request


async def replicas(address: str) -> list[str]:
    """Every address a `host:port` resolves to (a scaled compose service has one per
    replica), as `ip:port`; a unix socket path is its own single replica."""
    if address.startswith("/"):
        return [address]
    target = parse_host_port(address)
    infos = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM
    )
    found = dict.fromkeys(str(HostPort(str(info[4][0]), target.port)) for info in infos)
    return sorted(found)


async def smtp_banner(address: str, timeout: float = 5.0) -> str:
    """A 220 greeting, then QUIT: what a client sees first (no EHLO, so no log noise)."""
    target = parse_host_port(address)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            banner = (await reader.readline()).decode(errors="replace").strip()
            while banner[3:4] == "-":  # a multi-line greeting: its last line ends it
                banner = (await reader.readline()).decode(errors="replace").strip()
            if not banner.startswith("220"):
                raise ConnectionError(f"banner {banner[:80]!r}")
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()
    return banner


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


async def milter(address: str, timeout: float = 5.0) -> str:
    """Option negotiation, as Postfix opens every milter session; then QUIT."""
    target = parse_host_port(address)
    decoder = milter_codec.ReplyDecoder()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(milter_codec.encode_negotiation())
            replies: list[milter_codec.Reply] = []
            while not replies:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("milter closed the connection")
                replies = decoder.feed(data)
            writer.write(milter_codec.QUIT)
            await writer.drain()
        except milter_codec.MilterProtocolError as error:
            raise ConnectionError(f"milter answered garbage: {error}") from None
        finally:
            writer.close()
    negotiation = replies[0].negotiation
    if negotiation is None:
        raise ConnectionError(f"milter answered {replies[0].code!r} to option negotiation")
    return (f"milter v{negotiation.version} actions=0x{negotiation.actions:x} "
            f"protocol=0x{negotiation.protocol:x}")


async def http_health(address: str, timeout: float = 5.0) -> str:
    """`GET /healthz` answered 200 (the gateway's liveness), over plain HTTP/1.0."""
    target = parse_host_port(address)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
            status = (await reader.readline()).decode(errors="replace").strip()
        finally:
            writer.close()
    if status.split(" ")[1:2] != ["200"]:
        raise ConnectionError(f"answered {status[:80]!r}")
    return status


PROBES = {
    "smtp": smtp_ehlo, "banner": smtp_banner, "policy": policy, "clamd": clamd,
    "spamd": spamd, "milter": milter, "http": http_health,
}


# What an unhealthy peer makes a probe raise.
PROBE_ERRORS = (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError)


def main() -> None:
    """`secumail-probe KIND ADDRESS`: exit 0 when healthy (for container HEALTHCHECKs)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(PROBES))
    parser.add_argument("address")
    args = parser.parse_args()
    try:
        print(asyncio.run(PROBES[args.kind](args.address)))
    except PROBE_ERRORS as error:
        print(f"unhealthy: {describe(error)}", file=sys.stderr)
        raise SystemExit(1) from None
