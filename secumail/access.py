"""Who may open a session with an internal service: networks, and host names that stand for
every address they resolve to (a scaled compose service has one per replica).

The content filters relay into a next hop that trusts them; left open, anyone who reaches
their port could relay through them past every check. Each filter therefore names the hosts
that hand it mail (SECUMAIL_CLAMAV_ALLOWED_CLIENTS, SECUMAIL_SPAMD_ALLOWED_CLIENTS); names are
resolved again every REFRESH seconds, and at once (at most every MISS_REFRESH seconds) when
an unknown address connects, so that a new replica is let in within seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from secumail.logs import log_event
from secumail.netaddr import IPAddress, Network, parse_ip, parse_network

log = logging.getLogger("secumail.access")

# The service's own healthcheck connects over loopback (127.0.0.1, ::1): always allowed. The
# rest of 127/8 is not, so that tests can stand for another host with 127.0.0.2.
LOOPBACK = (parse_network("127.0.0.1/32"), parse_network("::1/128"))

Resolve = Callable[[str], Awaitable[list[str]]]


async def resolve_all(name: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def split_entries(entries: list[str]) -> tuple[list[Network], list[str]]:
    """Networks (IPs count as /32 or /128) and host names; ValueError for anything else."""
    networks, names = [], []
    for entry in entries:
        try:
            networks.append(parse_network(entry))
        except ValueError:
            name = entry.strip().rstrip(".").lower()
            if not name or any(not label or len(label) > 63 for label in name.split(".")) \
                    or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"not an IP address, network or host name: {entry!r}") from None
            names.append(name)
    return networks, names


class AllowedClients:
    REFRESH = 30.0
    MISS_REFRESH = 2.0

    def __init__(self, entries: list[str], resolve: Resolve = resolve_all,
                 clock: Callable[[], float] = time.monotonic) -> None:
        networks, self.names = split_entries(entries)
        self.networks = [*LOOPBACK, *networks]
        self.resolve = resolve
        self.clock = clock
        self._addresses: frozenset[IPAddress] = frozenset()
        self._resolved_at = float("-inf")
        self._resolving: asyncio.Future[None] | None = None

    def __str__(self) -> str:
        return ",".join([*(str(n) for n in self.networks[len(LOOPBACK):]), *self.names])

    async def allows(self, address: str) -> bool:
        ip = parse_ip(address)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.networks):
            return True
        if not self.names:
            return False
        age = self.clock() - self._resolved_at
        if age >= self.REFRESH or (ip not in self._addresses and age >= self.MISS_REFRESH):
            await self._refresh()
        return ip in self._addresses

    async def _refresh(self) -> None:
        """Resolve every name once, however many connections are waiting for it. Each waits
        on its own reference, and the lookup is forgotten when it ends: when its first waiter
        forgot it, the others failed, and a filter left those clients without a greeting."""
        resolving = self._resolving
        if resolving is None:
            resolving = self._resolving = asyncio.ensure_future(self._resolve_names())
            resolving.add_done_callback(self._forget)
        await asyncio.shield(resolving)

    def _forget(self, _: asyncio.Future[None]) -> None:
        self._resolving = None

    async def _resolve_names(self) -> None:
        found: set[IPAddress] = set()
        for name in self.names:
            try:
                addresses = await self.resolve(name)
            except OSError as error:  # not running (yet), or DNS trouble: that name only
                log_event(log, "allowed client name does not resolve", logging.DEBUG,
                          name=name, error=str(error))
                continue
            found.update(ip for ip in map(parse_ip, addresses) if ip is not None)
        self._addresses = frozenset(found)
        self._resolved_at = self.clock()
