"""DNS list lookups: DNSBL zones (each listing adds its weight; reaching the threshold
rejects) and DNSWL zones (selective greylisting's whitelist signal)."""

from __future__ import annotations

import asyncio
import ipaddress

import dns.resolver

from secumail.dns import AddressLookup


def dnsbl_query_name(client_address: str, zone: str) -> str:
    """`1.2.3.4` in `zone` -> `4.3.2.1.zone`; IPv6 as reversed nibbles (RFC 5782)."""
    ip = ipaddress.ip_address(client_address)
    reversed_name = ip.reverse_pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa
    return f"{reversed_name}.{zone}"


def is_listing(addresses: list[str]) -> bool:
    """A listing answers 127.0.0.0/8; 127.255.255.0/24 (DNSBLs) and 127.0.0.255 (DNSWL) say
    the query itself was refused (over quota, public resolver): no listing."""
    for text in addresses:
        ip = ipaddress.ip_address(text)
        refused = text.startswith("127.255.255.") or text == "127.0.0.255"
        if ip in ipaddress.ip_network("127.0.0.0/8") and not refused:
            return True
    return False


def dnsbl_verdict(
    listed: dict[str, bool], weights: dict[str, float], threshold: float
) -> tuple[bool, float, list[str]]:
    """Whether to reject, the total weight of the zones that list the client, and those zones."""
    zones = [zone for zone, hit in listed.items() if hit]
    score = sum(weights[z] for z in zones)
    return score >= threshold, score, zones


async def lookup_zone(resolver: AddressLookup, client_address: str, zone: str) -> bool:
    try:
        answer = await resolver.resolve(
            dnsbl_query_name(client_address, zone), "A", raise_on_no_answer=False
        )
    except dns.resolver.NXDOMAIN:
        return False
    return is_listing([r.address for r in answer])


async def lookup_all(
    resolver: AddressLookup, client_address: str, zones: list[str]
) -> dict[str, bool]:
    """Ask every zone at once; a DNS failure of any zone raises (the engine decides what then)."""
    results = await asyncio.gather(*(lookup_zone(resolver, client_address, z) for z in zones))
    return dict(zip(zones, results, strict=True))
