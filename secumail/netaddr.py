"""Small address helpers shared by settings, the policy service and the filters."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, default_port: int | None = None) -> HostPort:
    """Parse `host:port`, `[v6]:port`, or a bare host/IPv6 address when a default port is given."""
    text = text.strip()
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port:
        if default_port is None:
            raise ValueError(f"no port in {text!r} (expected host:port)")
        return HostPort(host, default_port)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return HostPort(host, int(port))


def parse_network(text: str) -> Network:
    """Parse a network as Postfix writes it (`[::1]/128` as well as `::1/128`, bare IPs too)."""
    cleaned = text.strip().replace("[", "").replace("]", "")
    try:
        return ipaddress.ip_network(cleaned, strict=False)
    except ValueError:
        raise ValueError(f"bad network {text!r}") from None


def postfix_network(net: Network) -> str:
    """The form Postfix's mynetworks wants: IPv6 in brackets."""
    if net.version == 6:
        return f"[{net.network_address}]/{net.prefixlen}"
    return str(net)


def parse_ip(text: str) -> IPAddress | None:
    """A client address as Postfix sends it; None for "unknown" or anything not an IP."""
    try:
        # inet_pton is as strict as ipaddress (no leading zeros, four parts) and 4x cheaper.
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        pass
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_network(ip: IPAddress) -> str:
    """The network greylisting groups a client into: /24 for IPv4, /64 for IPv6 (as postgrey)."""
    if ip.version == 4:
        octets = ip.packed
        return f"{octets[0]}.{octets[1]}.{octets[2]}.0/24"  # as ip_network() says it, cheaper
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


async def resolve(address: HostPort) -> list[tuple[str, int]]:
    """Every address `host:port` resolves to (a scaled compose service has one per replica),
    in the resolver's order, each once. OSError when it does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


def peer_name(peer: object) -> str:
    """`ip:port` of a connection's peer (transport.get_extra_info("peername")), or "?"."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"
