"""What of Postfix's log reaches the container's log (services/postfix/supervisor.py), and
the Postfix container's check of its subnets (services/postfix/main.py)."""

from __future__ import annotations

import ipaddress
import re

import pytest
from pydantic import ValidationError

from secumail.settings import Settings
from services.postfix.main import local_addresses, subnet_mismatches
from services.postfix.supervisor import shown

PREFIX = b"Nov 29 12:00:00 postfix postfix/smtpd[77]: "


def test_the_healthchecks_sessions_are_not_shown() -> None:
    for line in (b"connect from localhost[127.0.0.1]",
                 b"disconnect from localhost[127.0.0.1] ehlo=1 quit=1 commands=2",
                 b"lost connection after EHLO from unknown[127.0.0.1]"):
        assert not shown(PREFIX + line + b"\n"), line


def test_every_other_line_is_shown() -> None:
    for line in (b"connect from unknown[172.29.126.1]",
                 b"disconnect from mail.remote.test[203.0.113.7] ehlo=1 quit=1 commands=2",
                 b"NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 <x@y.test>: "
                 b"Relay access denied",
                 b"connect from unknown[127.0.0.10]"):
        assert shown(PREFIX + line + b"\n"), line


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 172.29.124.0/22 2 0 2
           |-- 172.29.124.0
              /24 link UNICAST
           |-- 172.29.124.2
              /32 host LOCAL
           |-- 172.29.125.0
              /24 link UNICAST
           |-- 172.29.125.3
              /32 host LOCAL
           |-- 172.29.126.0
              /24 link UNICAST
           |-- 172.29.126.5
              /32 host LOCAL
        |-- 172.29.126.255
           /32 link BROADCAST
"""


def test_the_containers_addresses_come_from_fib_trie() -> None:
    assert local_addresses(FIB_TRIE) == {ipaddress.ip_address(a) for a in (
        "127.0.0.1", "172.29.124.2", "172.29.125.3", "172.29.126.5")}


def test_a_subnet_the_container_is_not_in_is_named_with_both_values() -> None:
    addresses = local_addresses(FIB_TRIE)
    assert subnet_mismatches(Settings(), addresses) == []
    [problem] = subnet_mismatches(Settings(filter_subnet="10.9.0.0/24"), addresses)
    assert problem.startswith("SECUMAIL_FILTER_SUBNET=10.9.0.0/24, but this container's "
                              "addresses are 127.0.0.1, 172.29.124.2, 172.29.125.3, "
                              "172.29.126.5")


def test_the_docker_host_is_trusted_only_when_asked() -> None:
    assert Settings().trusted_networks == Settings().mynetworks
    trusting = Settings(trust_docker_host=True, edge_subnet="10.1.0.0/24")
    assert trusting.in_mynetworks(ipaddress.ip_address("10.1.0.1"))
    assert not trusting.in_mynetworks(ipaddress.ip_address("10.1.0.2"))
    assert not trusting.in_mynetworks(ipaddress.ip_address("172.29.126.1"))
    assert not Settings().in_mynetworks(ipaddress.ip_address("172.29.124.1"))


def test_overlapping_subnets_are_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match=re.escape(
            "SECUMAIL_EDGE_SUBNET=172.29.125.0/25 and SECUMAIL_FILTER_SUBNET=172.29.125.0/24 "
            "overlap")):
        Settings(edge_subnet="172.29.125.0/25")
