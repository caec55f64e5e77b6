"""The policy service's address helpers agree with the ipaddress module they shortcut."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from secumail.netaddr import IPAddress, client_network, parse_ip

octet_text = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["01", "00", "1a", "", " 1"]))
ipv4_like = st.lists(octet_text, min_size=3, max_size=5).map(".".join)


def reference(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@settings(deadline=None)  # 100 examples; 3,000 with HYPOTHESIS_PROFILE=fuzz
@given(st.one_of(ipv4_like, st.text(max_size=45), st.ip_addresses().map(str)))
def test_parse_ip_accepts_exactly_what_ipaddress_accepts(text: str) -> None:
    assert parse_ip(text) == reference(text)


@given(st.ip_addresses())
def test_client_network_is_the_24_or_64_ipaddress_computes(ip: IPAddress) -> None:
    prefix = 24 if ip.version == 4 else 64
    assert client_network(ip) == str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def test_unknown_and_junk_are_not_addresses() -> None:
    assert parse_ip("unknown") is None
    assert parse_ip("1.2.3.4\x00") is None
    assert parse_ip("203.0.113.45") == ipaddress.IPv4Address("203.0.113.45")
    assert parse_ip("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
