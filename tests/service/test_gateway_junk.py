"""Junk on the gateway's port (8080): garbage, endless header lines, idle and half-sent
requests. Each offender is dropped with a log line; the gateway goes on answering, and its
memory stays bounded."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.processes import Daemon, free_port, rss_kib, service_env, start_service


@pytest.fixture
def gateway() -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    env = service_env(
        gateway_listen=f"127.0.0.1:{port}",
        gateway_request_timeout="1",
        probe_interval="0",
        greylist_store="sqlite:///nonexistent/greylist.sqlite",
    )
    daemon = start_service("secumail-gateway", env, "SECUMAIL_GATEWAY_LISTEN")
    yield daemon, port
    daemon.stop()


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return int(response.status)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the gateway hangs up (whatever it answers first) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        bytes(range(256)) * 16,
        b"X-A: " + b"a" * 200_000,
    ],
    ids=["idle", "half-sent request", "binary garbage", "endless header line"],
)
def test_junk_is_dropped_and_the_gateway_goes_on(gateway: tuple[Daemon, int], junk: bytes) -> None:
    daemon, port = gateway
    offenders = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for sock in offenders:
        try:
            sock.sendall(junk)
        except OSError:
            pass  # already refused: garbage may be answered with a 400 and a hang-up
    assert healthz(port) == 200  # the others are served meanwhile
    assert all(closed_within(sock, 5) for sock in offenders)
    for sock in offenders:
        sock.close()
    assert healthz(port) == 200
    if junk in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
        assert daemon.logged("no complete request within 1 s")


def test_a_flood_of_idle_connections_leaves_memory_bounded(gateway: tuple[Daemon, int]) -> None:
    daemon, port = gateway
    assert healthz(port) == 200
    before = rss_kib(daemon.proc.pid)
    for _ in range(3):
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        assert all(closed_within(sock, 5) for sock in flood)
        for sock in flood:
            sock.close()
    assert healthz(port) == 200
    after = rss_kib(daemon.proc.pid)
    print(f"gateway RSS before {before} KiB, after 900 idle connections {after} KiB")
    assert after - before < 20_000, (before, after)
