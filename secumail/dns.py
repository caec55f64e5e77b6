"""The one DNS resolver factory: SPF, DKIM and DNSBL code all resolve through it.

`SECUMAIL_DNS_SERVERS` (comma list of host[:port]) points every lookup at chosen servers;
tests use it to aim at a DNS server they start themselves, so no lookup leaves the machine.
Empty means the system resolver (/etc/resolv.conf).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections import OrderedDict
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from secumail.netaddr import HostPort


class DnsTemporaryError(Exception):
    """The DNS did not answer (timeout, SERVFAIL, no server reachable): a lookup that may
    succeed later (DKIM and DMARC then report temperror)."""


def _configure(
    resolver: dns.resolver.BaseResolver, servers: list[HostPort], timeout: float
) -> None:
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers]
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)


def make_resolver(servers: list[HostPort], timeout: float) -> dns.resolver.Resolver:
    """A blocking resolver, for libraries that resolve synchronously (pyspf, dkimpy)."""
    resolver = dns.resolver.Resolver(configure=not servers)
    _configure(resolver, servers, timeout)
    resolver.cache = dns.resolver.LRUCache(10000)
    return resolver


def make_async_resolver(servers: list[HostPort], timeout: float) -> dns.asyncresolver.Resolver:
    """An asyncio resolver, for lookups made from the event loop (DNSBL)."""
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    _configure(resolver, servers, timeout)
    resolver.cache = dns.resolver.LRUCache(10000)
    return resolver


async def name_resolves(resolver: AddressLookup, name: str) -> bool:
    """Whether `name` has an A or AAAA record. A name DNS cannot even carry (bad syntax, a
    single label) does not resolve; a DNS failure raises (the caller fails open or closed)."""
    name = name.strip().rstrip(".")
    if "." not in name:
        return False
    try:
        query = dns.name.from_text(name)
    except dns.exception.DNSException:
        return False
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(query, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return False
        if len(answer):
            return True
    return False


class Address(NamedTuple):
    """One A or AAAA record, read as dnspython's rdata are (`.address`)."""

    address: str


_TYPES = {"A": 1, "AAAA": 28}
_SOA = 6
MAX_NEGATIVE_TTL = 300
MAX_TTL = 3600


class AddressResolver:
    """A and AAAA lookups over UDP, answers (and NXDOMAIN) cached for their TTL.

    The policy service asks a DNSBL, a DNSWL and a HELO name for nearly every new client,
    thousands a second: dnspython spends about half a millisecond of CPU on each query (a
    socket, a message object, its rdata), which made those lookups most of the service's
    work. This asks the same questions with one prebuilt packet over a kept socket, replaced
    every SOCKET_USES queries (a new random source port: with the random query ID and the
    question checked in the answer, an off-path forger has to guess both). Called as
    dnspython's resolver is (`resolve(name, "A", raise_on_no_answer=False)`, NXDOMAIN and
    Timeout raised), so the code and the tests' fakes serve with either.
    """

    SOCKET_USES = 64
    CACHE_SIZE = 10000

    def __init__(self, servers: list[HostPort], timeout: float) -> None:
        if servers:
            self.servers = [(s.host, s.port) for s in servers]
        else:  # the system's resolvers, as dnspython reads /etc/resolv.conf
            self.servers = [(str(n), 53) for n in dns.resolver.Resolver().nameservers]
        self.timeout = timeout
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[Address] | None]] = \
            OrderedDict()
        self._endpoints: dict[tuple[str, int], _Endpoint] = {}
        self._opening = asyncio.Lock()

    async def resolve(self, qname: object, rdtype: str = "A",
                      raise_on_no_answer: bool = True) -> list[Address]:
        name = str(qname).rstrip(".").lower()
        qtype = _TYPES[rdtype]
        key = (name, qtype)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is None or cached[0] < now:
            answer, ttl = await self._ask(name, qtype)
            cached = (now + ttl, answer)
            self._cache[key] = cached
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if cached[1] is None:
            raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
        if not cached[1] and raise_on_no_answer:
            raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
        return cached[1]

    async def _ask(self, name: str, qtype: int) -> tuple[list[Address] | None, float]:
        question = _question(name, qtype)  # raises a DNSException for a name DNS cannot carry
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while (left := deadline - time.monotonic()) > 0:
            server = self.servers[attempt % len(self.servers)]
            attempt += 1
            endpoint = await self._endpoint(server)
            try:
                reply = await endpoint.ask(question, min(left, 2.0))
            except TimeoutError:
                continue
            if reply is not None:
                return reply
        raise dns.exception.Timeout()  # type: ignore[no-untyped-call]

    async def _endpoint(self, server: tuple[str, int]) -> _Endpoint:
        endpoint = self._endpoints.get(server)
        if endpoint is not None and endpoint.uses < self.SOCKET_USES and not endpoint.closed:
            return endpoint
        async with self._opening:  # one new socket, however many queries wait for it
            endpoint = self._endpoints.get(server)
            if endpoint is None or endpoint.uses >= self.SOCKET_USES or endpoint.closed:
                if endpoint is not None:
                    endpoint.retire()
                loop = asyncio.get_running_loop()
                _, endpoint = await loop.create_datagram_endpoint(_Endpoint, remote_addr=server)
                self._endpoints[server] = endpoint
            return endpoint

    def close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.retire()
        self._endpoints.clear()


def _question(name: str, qtype: int) -> bytes:
    """The question section: the name's labels, the type, class IN."""
    try:
        labels = name.encode("ascii").split(b".") if name else []
    except UnicodeError:
        labels = []
    if not labels or any(not 0 < len(label) < 64 for label in labels) or len(name) > 253:
        raise dns.name.BadLabelType(  # type: ignore[no-untyped-call]
            f"not a DNS name: {name[:80]!r}")
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0" + \
        struct.pack("!HH", qtype, 1)


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after a (possibly compressed) name; IndexError when it runs off the end."""
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


def _read_reply(data: bytes, question: bytes) -> tuple[list[Address] | None, float] | None:
    """(addresses, or None for NXDOMAIN; TTL) from a reply to `question`; None for a reply
    that is not an answer (SERVFAIL, REFUSED, truncated): the next server is asked."""
    flags = struct.unpack_from("!H", data, 2)[0]
    ancount, nscount = struct.unpack_from("!HH", data, 6)
    rcode = flags & 0xF
    if flags & 0x0200 or rcode not in (0, 3):
        return None
    offset = 12 + len(question)
    qtype = struct.unpack_from("!H", question, len(question) - 4)[0]
    addresses: list[Address] = []
    ttl = float(MAX_TTL)
    for _ in range(ancount):
        offset = _skip_name(data, offset)
        rtype, rclass, rttl, length = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if rtype == qtype and rclass == 1 and length in (4, 16):
            family = socket.AF_INET if length == 4 else socket.AF_INET6
            addresses.append(Address(socket.inet_ntop(family, data[offset:offset + length])))
            ttl = min(ttl, rttl)
        offset += length
    if rcode == 0 and addresses:
        return addresses, ttl
    negative = float(MAX_NEGATIVE_TTL)  # NXDOMAIN or no such record: the SOA's minimum
    for _ in range(nscount):
        offset = _skip_name(data, offset)
        rtype, _, rttl, length = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if rtype == _SOA:
            minimum = struct.unpack_from("!I", data, offset + length - 4)[0]
            negative = min(negative, rttl, minimum)
        offset += length
    return (None if rcode == 3 else []), negative


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket to one server; replies matched to questions by ID and question."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, asyncio.Future[tuple[list[Address] | None,
                                                                  float] | None]]] = {}
        self.uses = 0
        self.closed = False
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for _, future in self.pending.values():
            if not future.done():
                future.set_exception(TimeoutError())

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: no server there
        for _, future in self.pending.values():
            if not future.done():
                future.set_result(None)

    def retire(self) -> None:
        self.retired = True
        if not self.pending and self.transport is not None:
            self.transport.close()

    async def ask(self, question: bytes, timeout: float
                  ) -> tuple[list[Address] | None, float] | None:
        assert self.transport is not None
        self.uses += 1
        while (qid := _random.getrandbits(16)) in self.pending:
            pass
        future: asyncio.Future[tuple[list[Address] | None, float] | None] = \
            asyncio.get_running_loop().create_future()
        self.pending[qid] = (question, future)
        try:
            self.transport.sendto(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question)
            return await asyncio.wait_for(future, timeout)
        finally:
            del self.pending[qid]
            if self.retired and not self.pending and self.transport is not None:
                self.transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        qid, flags = struct.unpack_from("!HH", data)
        waiting = self.pending.get(qid)
        if waiting is None or not flags & 0x8000:
            return
        question, future = waiting
        # The question must come back as asked (the name's case aside): else not our answer.
        if data[12:12 + len(question)].lower() != question.lower() or future.done():
            return
        try:
            future.set_result(_read_reply(data, question))
        except (IndexError, struct.error):
            future.set_result(None)  # a malformed reply: ask again


_random = random.SystemRandom()


# What the policy service's list and name lookups accept: the lean resolver, or dnspython's.
AddressLookup = AddressResolver | dns.asyncresolver.Resolver
