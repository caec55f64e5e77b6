"""Probes of every hop of the chain: container healthchecks and the gateway use them.

Each probe opens a real session with the service and checks the answer a healthy one
gives; each protocol's probe lives with the protocol (secumail/protocols/), and this table
names them. `replicas` turns a compose service name into every replica's address.

    secumail-probe KIND ADDRESS      exit 0 when healthy (container HEALTHCHECKs)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from secumail.logs import describe
from secumail.netaddr import HostPort, parse_host_port, resolve
from secumail.protocols import clamd, milter, policy, smtp, spamc

Probe = Callable[[str, float], Coroutine[Any, Any, str]]


async def replicas(address: str) -> list[str]:
    """Every address a `host:port` resolves to (a scaled compose service has one per
    replica), as `ip:port`; a unix socket path is its own single replica."""
    if address.startswith("/"):
        return [address]
    found = await resolve(parse_host_port(address))
    return sorted(str(HostPort(host, port)) for host, port in found)


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


# kind -> (the probe, what it does: for people reading /health)
PROBES: dict[str, tuple[Probe, str]] = {
    "banner": (smtp.banner_probe, "SMTP banner"),
    "smtp": (smtp.ehlo_probe, "EHLO"),
    "policy": (policy.probe, "policy request"),
    "milter": (milter.probe, "milter option negotiation"),
    "clamd": (clamd.probe, "PING"),
    "spamd": (spamc.probe, "PING"),
    "http": (http_health, "GET /healthz"),
}

# What an unhealthy peer makes a probe raise.
PROBE_ERRORS = (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError,
                smtp.SmtpUnavailable)


NOBODY = 65534  # also the Postfix agent's user when root owns the mailboxes


def drop_root() -> None:
    """Postfix's container runs as root (its master binds port 25), and so does its
    HEALTHCHECK; a probe needs no privilege to talk to a port, so it never reads a
    peer's answer as root."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def main() -> None:
    """`secumail-probe KIND ADDRESS`: exit 0 when healthy (for container HEALTHCHECKs)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(PROBES))
    parser.add_argument("address")
    args = parser.parse_args()
    drop_root()
    probe, _ = PROBES[args.kind]
    try:
        print(asyncio.run(probe(args.address, 5.0)))
    except PROBE_ERRORS as error:
        print(f"unhealthy: {describe(error)}", file=sys.stderr)
        raise SystemExit(1) from None
