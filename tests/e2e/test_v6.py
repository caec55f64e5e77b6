"""IPv6 clients, with compose.ipv6.yaml (README, "Clients' addresses"). Last of the compose
tests: it deploys the stack again with the IPv6 file, which makes the networks anew."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time
import uuid

import pytest

from tests.e2e.conftest import IPV6_FILES, Stack


def host_ipv6() -> str | None:
    """A global IPv6 address of this host, for a client to connect from."""
    done = subprocess.run(["ip", "-6", "-o", "addr", "show", "scope", "global"],
                          capture_output=True, text=True)
    for line in done.stdout.splitlines():
        fields = line.split()
        if "inet6" in fields and "deprecated" not in fields:
            return fields[fields.index("inet6") + 1].split("/")[0]
    return None


def test_an_ipv6_client_is_seen_with_its_own_address(stack: Stack) -> None:
    """Through compose.ipv6.yaml's published port, Postfix and the policy service see the
    IPv6 client's own address, not one of Docker's."""
    if subprocess.run(["ip6tables", "-t", "nat", "-S", "DOCKER"],
                      capture_output=True).returncode != 0:
        pytest.skip("dockerd runs without ip6tables (scripts/install-docker.sh starts it so)")
    address = host_ipv6()
    if address is None:
        pytest.skip("this host has no global IPv6 address to connect from")
    stack.redeploy(IPV6_FILES)
    port = int(os.environ["SECUMAIL_SMTP_PUBLISH6"].rsplit(":", 1)[1])
    sender = f"v6.{uuid.uuid4().hex[:8]}@sender.test"
    with smtplib.SMTP(address, port, timeout=60, source_address=(address, 0)) as smtp:
        smtp.ehlo("client.sender.test")
        assert smtp.mail(sender)[0] == 250
        code, reply = smtp.rcpt("alice@secumail.test")
    assert code == 450 and b"Greylisted" in reply, reply  # no rDNS: a bot's score
    assert f"connect from unknown[{address}]" in stack.logs("postfix")
    # The services write their log lines in batches (secumail/logs.py): wait for this one.
    deadline = time.monotonic() + 30
    while not (decided := [line for line in stack.logs("policy").splitlines()
                           if sender in line]):
        assert time.monotonic() < deadline, "no policy decision logged for the IPv6 client"
        time.sleep(1)
    assert all(f"client={address}" in line for line in decided), decided
