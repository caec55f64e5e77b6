"""Postfix's resolver (secumail/dns_forwarder.py) over real sockets: UDP and TCP queries to
the forwarder, answered by two DNS servers the test starts on loopback, one standing for
Docker's DNS (the stack's service names) and one for SECUMAIL_DNS_SERVERS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.reversename
import pytest

from secumail.dns_forwarder import Forwarder, serve
from secumail.netaddr import HostPort, parse_network
from testkit.dnsserver import LoopbackDNS
from testkit.processes import free_port

STACK = [parse_network("172.29.126.0/24")]
LONG_TXT = " ".join(f'"{"x" * 200}"' for _ in range(4))  # over 512 bytes in one answer


@pytest.fixture
def docker() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS().start()
    server.add("policy", "A", "172.29.126.7")
    server.add("7.126.29.172.in-addr.arpa", "PTR", "secumail-policy-1.secumail_mail.")
    yield server
    server.stop()


@pytest.fixture
def configured() -> Iterator[tuple[LoopbackDNS, LoopbackDNS]]:
    """The same zone over UDP and over TCP, on one port."""
    port = free_port()
    udp, tcp = LoopbackDNS(port=port), LoopbackDNS(port=port, tcp=True)
    for server in (udp, tcp):
        server.add("sender.lab.test", "A", "192.0.2.10")
        server.add("big.lab.test", "TXT", LONG_TXT)
        server.add("9.126.29.172.in-addr.arpa", "PTR", "outside-docker.lab.test.")
        server.add("1.2.0.192.in-addr.arpa", "PTR", "mx.lab.test.")
        server.start()
    yield udp, tcp
    for server in (udp, tcp):
        server.stop()


@pytest.fixture
async def forwarder(docker: LoopbackDNS, configured: tuple[LoopbackDNS, LoopbackDNS]
                    ) -> AsyncIterator[int]:
    """The forwarder on a loopback port; the first configured server answers nothing (a
    server down), so every answer also shows the fall-over to the second."""
    dead = HostPort("127.0.0.1", free_port())
    lab = HostPort(*configured[0].address)
    forwarder = Forwarder([dead, lab], [HostPort(*docker.address)], STACK, timeout=1.0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(8)
    task = asyncio.create_task(serve(forwarder, udp, tcp))
    yield port
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def ask(port: int, name: str, kind: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, kind)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", 5, port=port)
    return await dns.asyncquery.udp(query, "127.0.0.1", 5, port=port)


def names(queries: list[tuple[str, str]]) -> set[str]:
    return {name for name, _ in queries}


async def test_service_names_go_to_docker_and_every_other_name_to_the_configured_servers(
        forwarder: int, docker: LoopbackDNS, configured: tuple[LoopbackDNS, LoopbackDNS]
) -> None:
    answer = await ask(forwarder, "policy.", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["172.29.126.7"]
    answer = await ask(forwarder, "sender.lab.test.", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["192.0.2.10"]
    answer = await ask(forwarder, "nowhere.lab.test.", "A")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert names(docker.resolver.queries) == {"policy"}  # Docker heard of no lab name
    assert "policy" not in names(configured[0].resolver.queries)


async def test_reverse_names_of_the_stack_ask_docker_first_then_the_configured_servers(
        forwarder: int, docker: LoopbackDNS, configured: tuple[LoopbackDNS, LoopbackDNS]
) -> None:
    container = await ask(forwarder, dns.reversename.from_address("172.29.126.7"), "PTR")
    assert container.answer[0][0].to_text() == "secumail-policy-1.secumail_mail."
    not_docker = await ask(forwarder, dns.reversename.from_address("172.29.126.9"), "PTR")
    assert not_docker.answer[0][0].to_text() == "outside-docker.lab.test."
    outside = await ask(forwarder, dns.reversename.from_address("192.0.2.1"), "PTR")
    assert outside.answer[0][0].to_text() == "mx.lab.test."
    assert "1.2.0.192.in-addr.arpa" not in names(docker.resolver.queries)


async def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp(
        forwarder: int) -> None:
    over_udp = await ask(forwarder, "big.lab.test.", "TXT")
    assert over_udp.flags & dns.flags.TC and not over_udp.answer
    over_tcp = await ask(forwarder, "big.lab.test.", "TXT", tcp=True)
    assert len(b"".join(over_tcp.answer[0][0].strings)) == 800


async def test_garbage_gets_a_servfail_or_nothing_and_the_forwarder_keeps_answering(
        forwarder: int) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        client.connect(("127.0.0.1", forwarder))
        response = dns.message.make_response(dns.message.make_query("policy.", "A"))
        response.id = 0x5678
        for garbage in (response.to_wire(),  # an answer, not a query: never answered
                        b"\x12\x34\x01\x00" + b"\xff" * 30, b"x",
                        b"\x00" * 12 + b"\xc0\x0c" * 40):
            client.send(garbage)
        client.settimeout(2)
        answer = await loop.run_in_executor(None, client.recv, 512)
        assert answer[:2] == b"\x12\x34" and answer[3] & 0x0F == dns.rcode.SERVFAIL
    with socket.create_connection(("127.0.0.1", forwarder)) as stream:
        stream.sendall(b"\x00\x05hello")  # not even a DNS header: the connection is closed
        stream.settimeout(2)
        assert await loop.run_in_executor(None, stream.recv, 512) == b""
    answer = await ask(forwarder, "sender.lab.test.", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["192.0.2.10"]


async def test_no_server_answering_is_a_servfail_at_once(docker: LoopbackDNS) -> None:
    dead = HostPort("127.0.0.1", free_port())
    forwarder = Forwarder([dead], [HostPort(*docker.address)], STACK, timeout=0.5)
    query = dns.message.make_query("sender.lab.test.", "A")
    answer = await forwarder.answer(query.to_wire(), tcp=False)
    assert answer is not None
    parsed = dns.message.from_wire(answer)
    assert parsed.id == query.id and parsed.rcode() == dns.rcode.SERVFAIL
