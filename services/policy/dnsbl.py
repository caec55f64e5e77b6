"""DNS list lookups: DNSBL zones (each listing adds its weight; reaching the threshold
rejects) and DNSWL zones (selective greylisting's whitelist signal)."""

from __future__ import annotations

import ipaddress

from secumail.dns import AddressLookup
from secumail.netaddr import IPAddress


def reversed_address(ip: IPAddress) -> str:
    """`1.2.3.4` -> `4.3.2.1`, the name a DNS list is asked under (`4.3.2.1.zone`); IPv6
    as reversed nibbles (RFC 5782)."""
    return ip.reverse_pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa


_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def is_listing(addresses: list[str]) -> bool:
    """A listing answers 127.0.0.0/8; 127.255.255.0/24 (DNSBLs) and 127.0.0.255 (DNSWL) say
    the query itself was refused (over quota, public resolver): no listing."""
    for text in addresses:
        ip = ipaddress.ip_address(text)
        refused = text.startswith("127.255.255.") or text == "127.0.0.255"
        if ip in _LOOPBACK and not refused:
            return True
    return False


def dnsbl_verdict(
    listed: dict[str, bool], weights: dict[str, float], threshold: float
) -> tuple[bool, float, list[str]]:
    """Whether to reject, the total weight of the zones that list the client, and those zones."""
    zones = [zone for zone, hit in listed.items() if hit]
    score = sum(weights[z] for z in zones)
    return score >= threshold, score, zones


class ListQueries:
    """The questions to DNS lists about one client, all sent on creation (no task: each
    answer is a future the resolver ends); `listed` awaits them. A DNS failure of any zone
    raises there (the engine decides what then)."""

    def __init__(self, resolver: AddressLookup, reversed_name: str, zones: list[str]) -> None:
        """`reversed_name`: the client's address as `reversed_address` writes it."""
        self.asked = [(zone, resolver.lookup(f"{reversed_name}.{zone}")) for zone in zones]

    async def listed(self) -> dict[str, bool]:
        try:
            listed = {}
            for zone, answer in self.asked:
                addresses = await answer  # None: NXDOMAIN, not listed
                listed[zone] = bool(addresses) and is_listing([r.address for r in addresses or ()])
            return listed
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The answers nobody will read: the pending cancelled, failures marked retrieved
        (else asyncio logs them as never retrieved)."""
        for _, answer in self.asked:
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()

