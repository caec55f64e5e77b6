"""The policy service's lean A/AAAA resolver against real DNS servers on loopback: the
tests' DNS server, and a hostile one that answers first with forged replies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import dns.exception
import dns.resolver
import pytest

from secumail.dns import AddressResolver, name_resolves
from secumail.netaddr import parse_host_port
from testkit.dnsserver import LoopbackDNS


def resolver_for(server: LoopbackDNS, timeout: float = 2.0) -> AddressResolver:
    return AddressResolver([parse_host_port(server.spec)], timeout)


async def test_answers_nxdomain_nodata_and_the_cache(dns_server: LoopbackDNS) -> None:
    dns_server.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    dns_server.add("2.0.0.127.bl.test", "A", "127.0.0.10")
    dns_server.add("v6.test", "AAAA", "2001:db8::1")
    dns_server.add("txt-only.test", "TXT", '"hello"')
    resolver = resolver_for(dns_server)
    answer = await resolver.resolve("2.0.0.127.BL.test.", "A", raise_on_no_answer=False)
    assert sorted(r.address for r in answer) == ["127.0.0.10", "127.0.0.2"]
    assert [r.address for r in await resolver.resolve("v6.test", "AAAA")] == ["2001:db8::1"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nowhere.test", "A")
    assert await resolver.resolve("txt-only.test", "A", raise_on_no_answer=False) == []
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("txt-only.test", "A")
    asked = len(dns_server.resolver.queries)
    await resolver.resolve("2.0.0.127.bl.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nowhere.test", "A")
    assert len(dns_server.resolver.queries) == asked  # both from the cache
    assert await name_resolves(resolver, "v6.test") and not await name_resolves(resolver, "x.test")
    resolver.close()


async def test_a_server_that_never_answers_is_a_timeout(dns_server: LoopbackDNS) -> None:
    dns_server.make_slow("slow.test")
    resolver = resolver_for(dns_server, timeout=0.5)
    with pytest.raises(dns.exception.Timeout):
        await resolver.resolve("a.slow.test", "A")
    resolver.close()


async def test_many_queries_at_once_over_fresh_sockets(dns_server: LoopbackDNS) -> None:
    for n in range(200):
        dns_server.add(f"h{n}.test", "A", f"192.0.2.{n % 250}")
    resolver = resolver_for(dns_server)
    answers = await asyncio.gather(*(resolver.resolve(f"h{n}.test", "A") for n in range(200)))
    assert [a[0].address for a in answers] == [f"192.0.2.{n % 250}" for n in range(200)]
    resolver.close()


@contextlib.contextmanager
def udp_server(replies: Callable[[bytes], list[bytes]]) -> Iterator[tuple[str, int]]:
    """A hand-written DNS server on loopback: each query gets the datagrams `replies` makes
    of it, in order."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                query, client = sock.recvfrom(512)
            except TimeoutError:
                continue
            for reply in replies(query):
                sock.sendto(reply, client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.fixture
def forging_server() -> Iterator[tuple[str, int]]:
    """Answers each query three times: a reply with another ID, one with another question
    (both forged: 127.0.0.2, "listed"), then the true one (NXDOMAIN)."""

    def replies(query: bytes) -> list[bytes]:
        qid = struct.unpack_from("!H", query)[0]
        question = query[12:]
        listed = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4)
                  + socket.inet_aton("127.0.0.2"))
        forged_id = struct.pack("!HHHHHH", qid ^ 1, 0x8180, 1, 1, 0, 0) + question + listed
        other = b"\x01x" + question
        forged_question = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + other + listed
        true = struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question
        return [forged_id, forged_question, true]

    with udp_server(replies) as address:
        yield address


async def test_forged_replies_are_not_taken(forging_server: tuple[str, int]) -> None:
    host, port = forging_server
    resolver = AddressResolver([parse_host_port(f"{host}:{port}")], 2.0)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("7.113.0.203.bl.test", "A")
    resolver.close()


async def test_names_dns_cannot_carry_are_refused_before_asking(dns_server: LoopbackDNS) -> None:
    resolver = resolver_for(dns_server)
    for name in ("a" * 64 + ".test", "caf\u00e9.test", "a..test"):
        with pytest.raises(dns.exception.DNSException):
            await resolver.resolve(name, "A")
    assert dns_server.resolver.queries == []
    resolver.close()


@pytest.fixture
def refusing_server() -> Iterator[tuple[tuple[str, int], list[float]]]:
    """Answers every query REFUSED (as a resolver does to a client it does not serve); the
    times it was asked are listed."""
    asked: list[float] = []

    def replies(query: bytes) -> list[bytes]:
        asked.append(time.monotonic())
        qid = struct.unpack_from("!H", query)[0]
        return [struct.pack("!HHHHHH", qid, 0x8185, 1, 0, 0, 0) + query[12:]]

    with udp_server(replies) as address:
        yield address, asked


async def test_a_refusing_server_is_asked_a_few_times_not_in_a_busy_loop(
    refusing_server: tuple[tuple[str, int], list[float]],
) -> None:
    (host, port), asked = refusing_server
    resolver = AddressResolver([parse_host_port(f"{host}:{port}")], 1.0)
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        await resolver.resolve("2.0.0.127.bl.test", "A")
    assert time.monotonic() - started >= 0.9  # the whole lookup time, then a timeout
    assert 2 <= len(asked) <= 8, f"asked {len(asked)} times in 1 s"
    resolver.close()


async def test_the_next_server_answers_when_the_first_refuses(
    refusing_server: tuple[tuple[str, int], list[float]], dns_server: LoopbackDNS
) -> None:
    (host, port), asked = refusing_server
    dns_server.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    resolver = AddressResolver([parse_host_port(f"{host}:{port}"),
                                parse_host_port(dns_server.spec)], 5.0)
    answer = await asyncio.wait_for(resolver.resolve("2.0.0.127.bl.test", "A"), 1.0)
    assert [r.address for r in answer] == ["127.0.0.2"] and len(asked) == 1
    resolver.close()


async def test_no_server_listening_is_a_timeout_and_later_lookups_still_work(
    dns_server: LoopbackDNS,
) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    nobody = closed.getsockname()
    closed.close()  # its port answers with ICMP port unreachable
    resolver = AddressResolver([parse_host_port(f"{nobody[0]}:{nobody[1]}")], 0.6)
    with pytest.raises(dns.exception.Timeout):
        await resolver.resolve("a.test", "A")
    resolver.close()
    dns_server.add("a.test", "A", "192.0.2.7")
    dns_server.make_slow("slow.test")
    resolver = resolver_for(dns_server)
    waiting = resolver.lookup("x.slow.test")
    await asyncio.sleep(0.05)
    waiting.cancel()  # the engine cancels the answers no check needs
    answer = await resolver.resolve("a.test", "A")
    assert [r.address for r in answer] == ["192.0.2.7"]
    resolver.close()
