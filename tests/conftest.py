"""Fixtures shared by the test layers: a loopback DNS server, real daemons on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from testkit.dnsserver import LoopbackDNS
from testkit.policy_client import PolicyClient
from testkit.processes import Daemon, free_port, require_binary, wait_for_port
from testkit.scanners import Clamd, Spamd
from testkit.sink import SmtpSink

# Property and fuzz tests: 100 examples in the suite; HYPOTHESIS_PROFILE=fuzz runs 3,000.
settings.register_profile("fuzz", max_examples=3000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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


@pytest.fixture
def redis_with_password() -> Iterator[tuple[str, str]]:
    """A real redis-server that requires a password, as compose's Redis does: (url, password)."""
    binary = require_binary("redis-server")
    port, password = free_port(), "correct-horse-battery-staple"
    daemon = Daemon([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--requirepass", password])
    wait_for_port(port)
    yield f"redis://127.0.0.1:{port}/0", password
    daemon.stop()


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """Debian's clamd with the tests' own signatures (EICAR, clam.exe), shared by the tests."""
    daemon = Clamd().start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def spamd() -> Iterator[Spamd]:
    """Debian's spamd with local tests only, shared by the tests."""
    daemon = Spamd().start()
    yield daemon
    daemon.stop()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    yield server
    server.stop()
