"""Postfix's resolver when `SECUMAIL_DNS_SERVERS` is set: a DNS forwarder on 127.0.0.1:53.

Postfix resolves through the C library, which reads /etc/resolv.conf: one list of servers,
port 53 only, no rule per name. Docker writes there its own DNS (127.0.0.11), which knows
the stack's service names and forwards every other name to the host's resolver. On an
isolated or lab host that resolver knows nothing of the lab's domains, and Postfix refused
the first message (`550 5.1.8 Sender address rejected: Domain not found`) while the Python
services, which ask `SECUMAIL_DNS_SERVERS`, accepted it. The Postfix container then points
resolv.conf at this forwarder, which asks:

- Docker's DNS for a single-label name (`policy`, `clamav`, a container's name): the
  stack's own services;
- both for the reverse name of an address in one of the stack's subnets (a container's
  name, or whatever the configured servers say of it), Docker's answer first;
- the configured servers, in order, for every other name.

`route` is the decision, a plain function; `Forwarder` carries DNS messages (UDP and TCP)
and answers SERVFAIL when no server did, so the C library gives up at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.reversename

from secumail.logs import log_event
from secumail.netaddr import HostPort, Network

log = logging.getLogger("secumail.dns_forwarder")

DOCKER_DNS = HostPort("127.0.0.11", 53)
MAX_TCP_CLIENTS = 64
# Seconds Docker's DNS gets for a reverse name once the configured servers said they know
# none: it answers for its containers from memory, well under this; any other address it
# forwards to the host's resolver, which on an isolated host may never answer.
DOCKER_GRACE = 0.05
Route = Literal["docker", "configured", "both"]


def route(name: dns.name.Name, stack_subnets: Sequence[Network]) -> Route:
    """Which servers answer a question about `name` (see the module's docstring)."""
    labels = [label for label in name.labels if label]
    if len(labels) <= 1:
        return "docker"
    if name.is_subdomain(dns.reversename.ipv4_reverse_domain) or name.is_subdomain(
            dns.reversename.ipv6_reverse_domain):
        try:
            address = ipaddress.ip_address(dns.reversename.to_address(name))
        except (dns.exception.SyntaxError, ValueError):
            return "configured"  # a partial reverse name (a zone's own records)
        if any(address in subnet for subnet in stack_subnets):
            return "both"
    return "configured"


def resolv_conf(original: str, listen: str = "127.0.0.1") -> tuple[str, list[HostPort]]:
    """The resolv.conf that sends Postfix to the forwarder (the search and options lines
    kept), and the servers the original named (Docker's DNS, in a compose network)."""
    servers = []
    kept = []
    for line in original.splitlines():
        fields = line.split()
        if fields[:1] == ["nameserver"] and len(fields) > 1:
            servers.append(HostPort(fields[1], 53))
        elif fields:
            kept.append(line)
    return "\n".join([f"nameserver {listen}", *kept]) + "\n", servers


def servfail(query: bytes) -> bytes | None:
    """A SERVFAIL answer to `query` (None: not even a DNS header to answer)."""
    if len(query) < 12:
        return None
    flags = struct.unpack(">H", query[2:4])[0]
    answer_flags = 0x8000 | (flags & 0x7900) | 0x0080 | dns.rcode.SERVFAIL  # QR, opcode, RD, RA
    # The question is echoed only when it parses; a header alone is a valid answer too.
    try:
        response = dns.message.make_response(dns.message.from_wire(query))
    except dns.exception.DNSException:
        return query[:2] + struct.pack(">HHHHH", answer_flags, 0, 0, 0, 0)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


def question_name(query: bytes) -> dns.name.Name | None:
    """The name a query asks about (None: not a query with one question)."""
    if len(query) < 12 or query[2] & 0x80 or query[4:6] != b"\x00\x01":
        return None
    try:
        name, _ = dns.name.from_wire(query, 12)
    except dns.exception.DNSException:
        return None
    return name


def fitted(query: bytes, answer: bytes) -> bytes:
    """A UDP answer the client can take: a server that sent more than the client said it
    takes (512 bytes without EDNS, RFC 1035 4.2.1) is replaced by an empty truncated one,
    and the client asks again over TCP."""
    if len(answer) <= 512:
        return answer
    try:
        message = dns.message.from_wire(query)
    except dns.exception.DNSException:
        return answer  # question_name read it: cannot happen
    if len(answer) <= (max(512, message.payload) if message.edns >= 0 else 512):
        return answer
    truncated = dns.message.make_response(message)
    truncated.flags |= dns.flags.TC
    return truncated.to_wire()


def _rcode(answer: bytes) -> int:
    return answer[3] & 0x0F


def _names_something(answer: bytes) -> bool:
    return _rcode(answer) == dns.rcode.NOERROR and answer[6:8] != b"\x00\x00"


@dataclass
class Forwarder:
    configured: list[HostPort]
    docker: list[HostPort]
    stack_subnets: list[Network]
    timeout: float

    async def answer(self, query: bytes, tcp: bool) -> bytes | None:
        """The answer to one query, the bytes the first server that answered gave (over
        UDP a server fits it to the size the client said it takes, as the client asked it
        without us); SERVFAIL when none did; None for bytes that are not even a header."""
        if len(query) >= 3 and query[2] & 0x80:
            return None  # an answer, not a query: answering it could start a loop
        name = question_name(query)
        if name is None:
            log_event(log, "malformed DNS query", logging.WARNING, size=len(query))
            return servfail(query)
        where = route(name, self.stack_subnets)
        if where == "both":
            found = await self._either(query, tcp)
        else:
            servers = self.docker if where == "docker" else self.configured
            found = await self._first_answer(query, servers, tcp)
        if found is None:
            log_event(log, "no DNS server answered", logging.WARNING, name=name.to_text(),
                      route=where)
            return servfail(query)
        return found if tcp else fitted(query, found)

    async def _either(self, query: bytes, tcp: bool) -> bytes | None:
        """Both asked at once: the first answer that names something; else the configured
        servers' (NXDOMAIN), Docker given a moment more once they answered."""
        docker = asyncio.create_task(self._first_answer(query, self.docker, tcp))
        configured = asyncio.create_task(self._first_answer(query, self.configured, tcp))
        pending: set[asyncio.Task[bytes | None]] = {docker, configured}
        fallback = None
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED,
                    timeout=DOCKER_GRACE if configured.done() else None)
                if not done:
                    break
                for task in done:
                    found = task.result()
                    if found is not None and _names_something(found):
                        return found
                    if task is configured:
                        fallback = found
            return fallback
        finally:
            for task in pending:
                task.cancel()

    async def _first_answer(self, query: bytes, servers: list[HostPort], tcp: bool
                            ) -> bytes | None:
        for server in servers:
            try:
                # Each server gets 2 s at most, so that with a server down the next one
                # answers before the C library (5 s) gives up and asks again.
                async with asyncio.timeout(min(self.timeout, 2.0)):
                    found = await (_ask_tcp if tcp else _ask_udp)(query, server)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                log_event(log, "DNS server did not answer", logging.DEBUG, server=str(server),
                          error=f"{type(error).__name__}: {error}")
                continue
            if len(found) < 12 or _rcode(found) == dns.rcode.SERVFAIL:
                continue
            return found
        return None


async def _ask_udp(query: bytes, server: HostPort) -> bytes:
    """One query over a socket of its own (a new random port each time, as the C library
    does), connected: only the server's own address can answer it; an answer with
    another id or question is not ours and is dropped."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((server.host, server.port))
        await loop.sock_sendall(sock, query)
        question_end = 12 + len(query[12:].split(b"\x00", 1)[0]) + 5  # name, type, class
        while True:
            answer = await loop.sock_recv(sock, 65535)
            if len(answer) >= 12 and answer[:2] == query[:2] and answer[2] & 0x80 and (
                    answer[4:6] == b"\x00\x00"  # no question: a FORMERR or NOTIMP
                    or answer[12:question_end].lower() == query[12:question_end].lower()):
                return answer


async def _ask_tcp(query: bytes, server: HostPort) -> bytes:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(struct.pack(">H", len(query)) + query)
        (size,) = struct.unpack(">H", await reader.readexactly(2))
        return await reader.readexactly(size)
    finally:
        writer.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        task = asyncio.create_task(self._reply(data, address))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, address: tuple[str, int]) -> None:
        answer = await self.forwarder.answer(data, tcp=False)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, address)


async def serve(forwarder: Forwarder, udp: socket.socket, tcp: socket.socket) -> None:
    """Answer on the two bound sockets (bound by root, on port 53) until cancelled."""
    loop = asyncio.get_running_loop()
    clients = asyncio.Semaphore(MAX_TCP_CLIENTS)

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if clients.locked():
            writer.close()
            return
        async with clients:
            try:
                while True:  # RFC 7766: a connection may carry several queries
                    async with asyncio.timeout(forwarder.timeout * 2):
                        (size,) = struct.unpack(">H", await reader.readexactly(2))
                        query = await reader.readexactly(size)
                    answer = await forwarder.answer(query, tcp=True)
                    if answer is None:
                        break
                    writer.write(struct.pack(">H", len(answer)) + answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                pass
            finally:
                writer.close()

    transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(forwarder), sock=udp)
    server = await asyncio.start_server(tcp_client, sock=tcp)
    try:
        await server.serve_forever()
    finally:
        transport.close()
