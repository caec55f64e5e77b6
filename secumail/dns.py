"""The one DNS resolver factory: SPF, DKIM and DNSBL code all resolve through it.

`SECUMAIL_DNS_SERVERS` (comma list of host[:port]) points every lookup at chosen servers;
tests use it to aim at a DNS server they start themselves, so no lookup leaves the machine.
Empty means the system resolver (/etc/resolv.conf).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections import OrderedDict
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, overload

import dns.asyncresolver
import dns.exception
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
    single label, not ASCII) does not resolve; a DNS failure raises (the caller fails open or
    closed)."""
    name = name.strip().rstrip(".")
    if "." not in name:
        return False
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, NotADnsName):
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


Key = TypeVar("Key")
Value = TypeVar("Value")
Missing = TypeVar("Missing")


class TtlCache(Generic[Key, Value]):
    """The last `size` entries put, each until its TTL ends; the least recently used one is
    dropped first. `get` gives `missing` for an entry absent or expired."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Key, tuple[float, Value]] = OrderedDict()

    @overload
    def get(self, key: Key) -> Value | None: ...

    @overload
    def get(self, key: Key, missing: Missing) -> Value | Missing: ...

    def get(self, key: Key, missing: Any = None) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return missing
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Key, value: Value, ttl: float) -> None:
        self._entries[key] = (time.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


class NotADnsName(dns.exception.DNSException):
    """A name DNS cannot carry (a label too long or empty, not ASCII): refused unasked."""


# An answer: its addresses (empty: the name has no such record), or None for NXDOMAIN.
Answer = list[Address] | None


class AddressResolver:
    """A and AAAA lookups over UDP, answers (and NXDOMAIN) cached for their TTL.

    The policy service asks a DNSBL, a DNSWL and a HELO name for nearly every new client,
    thousands a second: dnspython spends about half a millisecond of CPU on each query (a
    socket, a message object, its rdata), which made those lookups most of the service's
    work. This asks the same questions with one prebuilt packet over a kept non-blocking
    socket, read by an event-loop reader callback: no task, transport or coroutine per
    query, one timer. A socket is replaced every SOCKET_USES queries (a new random source
    port: with the random query ID and the question checked in the answer, an off-path
    forger has to guess both). `lookup` gives the answer as a future (done already when
    cached); `resolve` is called as dnspython's resolver is (`resolve(name, "A",
    raise_on_no_answer=False)`, NXDOMAIN and Timeout raised), so that code and the tests'
    fakes serve with either.
    """

    SOCKET_USES = 64
    CACHE_SIZE = 10000

    def __init__(self, servers: list[HostPort], timeout: float) -> None:
        if servers:
            named = [(s.host, s.port) for s in servers]
        else:  # the system's resolvers, as dnspython reads /etc/resolv.conf
            named = [(str(n), 53) for n in dns.resolver.Resolver().nameservers]
        # Addresses once, here: a socket is opened from a callback, where nothing may block.
        self.servers = [_server_address(host, port) for host, port in named]
        self.timeout = timeout
        self._cache: TtlCache[tuple[str, int], Answer] = TtlCache(self.CACHE_SIZE)
        self._sockets: dict[tuple[int, tuple[Any, ...]], _Socket] = {}
        self.closed = False

    async def resolve(self, qname: object, rdtype: str = "A",
                      raise_on_no_answer: bool = True) -> list[Address]:
        answer = await self.lookup(str(qname), rdtype)
        if answer is None:
            raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
        if not answer and raise_on_no_answer:
            raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
        return answer

    def lookup(self, qname: str, rdtype: str = "A") -> asyncio.Future[Answer]:
        """The answer to one question, as a future: done at once when cached; else it ends
        with the answer, or dns.exception.Timeout when no server answered in time.
        NotADnsName (raised here) for a name DNS cannot carry."""
        name = qname.rstrip(".").lower()
        key = (name, _TYPES[rdtype])
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        cached = self._cache.get(key, _NOT_CACHED)
        if not isinstance(cached, _NotCached):
            future.set_result(cached)
            return future
        _Query(self, key, _question(name, key[1]), future).send()
        return future

    def remember(self, key: tuple[str, int], answer: Answer, ttl: float) -> None:
        self._cache.put(key, answer, ttl)

    def socket_for(self, attempt: int) -> _Socket:
        """The socket to the server of this attempt (servers taken in turn)."""
        server = self.servers[attempt % len(self.servers)]
        kept = self._sockets.get(server)
        if kept is None or kept.uses >= self.SOCKET_USES or kept.closed:
            if kept is not None:
                kept.retire()
            kept = self._sockets[server] = _Socket(server)
        return kept

    def close(self) -> None:
        """Every socket closed; the queries still on their way end as timeouts."""
        self.closed = True
        for kept in self._sockets.values():
            kept.retire(now=True)
        self._sockets.clear()


class _NotCached:
    pass


_NOT_CACHED = _NotCached()


def _server_address(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) of a DNS server: an address as it is, a name resolved once."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return family, sockaddr


class _Query:
    """One question on its way: sent to a server, asked again of the next one after a
    malformed or refused reply or a 2 s silence, until the lookup's time is up."""

    __slots__ = ("attempt", "deadline", "future", "key", "qid", "question", "resolver",
                 "socket", "timer")
    ROUND_PAUSE = 0.25

    def __init__(self, resolver: AddressResolver, key: tuple[str, int], question: bytes,
                 future: asyncio.Future[Answer]) -> None:
        self.resolver, self.key, self.question, self.future = resolver, key, question, future
        self.deadline = time.monotonic() + resolver.timeout
        self.attempt = 0
        self.timer: asyncio.TimerHandle | None = None
        self.socket: _Socket | None = None
        self.qid = 0

    def send(self) -> None:
        left = self.deadline - time.monotonic()
        if self.future.done():
            return  # cancelled: nobody waits any more
        if left <= 0 or self.resolver.closed:
            self.future.set_exception(dns.exception.Timeout())  # type: ignore[no-untyped-call]
            return
        try:
            self.socket = self.resolver.socket_for(self.attempt)
        except OSError as error:  # no socket to be had (out of file descriptors)
            self.future.set_exception(error)
            return
        self.attempt += 1
        self.qid = self.socket.send(self)
        self.timer = asyncio.get_running_loop().call_later(min(left, 2.0), self.unanswered)

    def unanswered(self) -> None:
        """No reply in 2 s: ask the next server now."""
        self._forget()
        self.send()

    def refused(self) -> None:
        """A reply that is no answer (SERVFAIL, REFUSED, malformed) or an ICMP error: the
        next server now; after every server refused, a pause before the next round (a
        refusing server would be asked in a busy loop until the deadline)."""
        self._forget()
        if self.attempt % len(self.resolver.servers):
            self.send()
        else:
            left = self.deadline - time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, min(left, self.ROUND_PAUSE)), self.send)

    def answered(self, reply: tuple[Answer, float]) -> None:
        self._forget()
        answer, ttl = reply
        self.resolver.remember(self.key, answer, ttl)
        if not self.future.done():  # it may have been cancelled meanwhile
            self.future.set_result(answer)

    def _forget(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.socket is not None:
            self.socket.release(self.qid)
            self.socket = None


class _Socket:
    """One connected UDP socket to one server; replies matched to queries by ID and
    question, read by a reader callback on the running loop."""

    def __init__(self, server: tuple[int, tuple[Any, ...]]) -> None:
        family, address = server
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(address)  # replies from elsewhere never reach it
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.pending: dict[int, _Query] = {}
        self.uses = 0
        self.closed = False
        self.retired = False
        self._ids = b""  # random query IDs, read from the OS a socket's worth at a time

    def send(self, query: _Query) -> int:
        self.uses += 1
        while True:
            if not self._ids:
                self._ids = os.urandom(2 * (AddressResolver.SOCKET_USES + 8))
            qid = int.from_bytes(self._ids[:2], "big")
            self._ids = self._ids[2:]
            if qid not in self.pending:
                break
        self.pending[qid] = query
        try:
            self.sock.send(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + query.question)
        except OSError:  # ECONNREFUSED: an ICMP error for an earlier query
            self.loop.call_soon(query.refused)
        return qid

    def release(self, qid: int) -> None:
        self.pending.pop(qid, None)
        if self.retired and not self.pending:
            self._close()

    def retire(self, now: bool = False) -> None:
        """No new queries; closed once the last pending one is answered or times out."""
        self.retired = True
        if now or not self.pending:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:  # ICMP unreachable: no server there; ask the next one
                for query in list(self.pending.values()):
                    query.refused()
                return
            self._received(data)

    def _received(self, data: bytes) -> None:
        if len(data) < 12:
            return
        qid, flags = struct.unpack_from("!HH", data)
        query = self.pending.get(qid)
        if query is None or not flags & 0x8000:
            return
        question = query.question
        # The question must come back as asked (the name's case aside): else not our answer.
        if data[12:12 + len(question)].lower() != question.lower():
            return
        try:
            reply = _read_reply(data, question)
        except (IndexError, struct.error):
            reply = None  # a malformed reply: ask again
        if reply is None:
            query.refused()
        else:
            query.answered(reply)


def _question(name: str, qtype: int) -> bytes:
    """The question section: the name's labels, the type, class IN."""
    try:
        labels = name.encode("ascii").split(b".") if name else []
    except UnicodeError:
        labels = []
    if not labels or any(not 0 < len(label) < 64 for label in labels) or len(name) > 253:
        raise NotADnsName(f"not a DNS name: {name[:80]!r}")  # type: ignore[no-untyped-call]
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


class AddressLookup(Protocol):
    """What the policy service's list and name lookups ask of a resolver: AddressResolver,
    or the unit tests' fake."""

    def lookup(self, qname: str, rdtype: str = "A") -> asyncio.Future[Answer]: ...

    async def resolve(self, qname: object, rdtype: str = "A",
                      raise_on_no_answer: bool = True) -> list[Address]: ...
