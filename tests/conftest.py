"""Fixtures shared by the test layers: a loopback DNS server, real daemons on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dnsserver import LoopbackDNS
from tests.support.policy_client import PolicyClient
from tests.support.processes import Daemon, free_port, require_binary, wait_for_port


@pytest.fixture(autouse=True)
def _close_policy_clients() -> Iterator[None]:
    yield
    PolicyClient.close_all()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    """A DNS server of the test's own on loopback; every lookup under test goes here."""
    server = LoopbackDNS().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server (Debian package) on a free loopback port, with no persistence."""
    binary = require_binary("redis-server")
    port = free_port()
    daemon = Daemon(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    )
    wait_for_port(port)
    yield f"redis://127.0.0.1:{port}/0"
    daemon.stop()
