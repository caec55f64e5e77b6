"""A DNS server the tests start on loopback, so that no SPF, DKIM or DNSBL lookup leaves
the machine. Records are added by the test; names under `slow_suffixes` never get an answer
(the client times out), which is how tests make DNS fail."""

from __future__ import annotations

import socket
import threading
import time

from dnslib import QTYPE, RCODE, RR, SOA, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSServer


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.names: set[str] = set()  # names with a record of any type (NODATA, not NXDOMAIN)
        self.slow_suffixes: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, qtype))
            answers = list(self.records.get((name, qtype), []))
            slow = any(name == s or name.endswith("." + s) for s in self.slow_suffixes)
            known = name in self.names
        if slow:
            time.sleep(10)
            # dnslib catches DNSError and sends nothing: the client times out.
            raise DNSError(f"no answer for {name} (made slow by the test)")
        reply = request.reply()
        for text in answers:
            reply.add_answer(*RR.fromZone(f"{name}. 60 IN {qtype} {text}"))
        if not answers and not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class LoopbackDNS:
    """`add("example.org", "TXT", '"v=spf1 -all"')`; `address` is (host, port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tcp: bool = False) -> None:
        self.resolver = ZoneResolver()
        self.server = DNSServer(self.resolver, port=port, address=host, logger=_Quiet(),
                                tcp=tcp)
        self.address = self.server.server.server_address

    @property
    def spec(self) -> str:
        """The form SECUMAIL_DNS_SERVERS takes."""
        return f"{self.address[0]}:{self.address[1]}"

    def add(self, name: str, qtype: str, value: str) -> None:
        name = name.lower().rstrip(".")
        with self.resolver.lock:
            self.resolver.records.setdefault((name, qtype), []).append(value)
            self.resolver.names.add(name)

    def make_slow(self, suffix: str) -> None:
        with self.resolver.lock:
            self.resolver.slow_suffixes.add(suffix)

    def start(self) -> LoopbackDNS:
        self.server.start_thread()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.server.server.server_close()


class ReplayingDNS(LoopbackDNS):
    """The same zone, answered as a caching resolver would: each distinct question is
    resolved once through ZoneResolver, then its packed reply is sent again with the new
    query's ID, from one thread. For benchmarks: dnslib's server starts a thread and parses
    and packs a message for every query (about 0.3 ms of CPU here), which made the test's
    DNS server, not the service measured, the busiest process of the policy benchmark.
    Negative answers carry an SOA (RFC 2308), as a real zone's do, so that clients may
    keep them. Records must all be added before `start`; `queries` is not kept."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.resolver = ZoneResolver()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((host, port))
        self.socket.settimeout(0.5)  # how soon the thread sees stop()
        self.address = self.socket.getsockname()
        self._stopped = threading.Event()
        self._replies: dict[bytes, bytes] = {}  # the query after its ID -> the reply after it

    def make_slow(self, suffix: str) -> None:
        raise NotImplementedError("a replayed answer cannot be slow: use LoopbackDNS")

    def start(self) -> ReplayingDNS:
        threading.Thread(target=self._serve, name="replaying-dns", daemon=True).start()
        return self

    def _serve(self) -> None:
        receive, send, replies = self.socket.recvfrom, self.socket.sendto, self._replies
        while not self._stopped.is_set():
            try:
                query, peer = receive(4096)
            except TimeoutError:
                continue
            reply = replies.get(query[2:])
            if reply is None:
                try:
                    packed = self._negative_with_soa(self.resolver.resolve(
                        DNSRecord.parse(query), None)).pack()
                except Exception:
                    continue  # not a DNS query: no answer, as dnslib's server does
                reply = replies[query[2:]] = packed[2:]
            send(query[:2] + reply, peer)

    @staticmethod
    def _negative_with_soa(reply: DNSRecord) -> DNSRecord:
        """NXDOMAIN and no-such-record answers with their zone's SOA, as a real zone's
        are (RFC 2308): how long a resolver may keep them (60 s here)."""
        if not reply.rr:
            zone = ".".join(str(reply.q.qname).rstrip(".").split(".")[-2:]) + "."
            reply.add_auth(RR(zone, QTYPE.SOA, ttl=60, rdata=SOA(
                f"ns.{zone}", f"hostmaster.{zone}", (1, 3600, 600, 86400, 60))))
        return reply

    def stop(self) -> None:
        self._stopped.set()
        self.socket.close()


class _Quiet:
    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None
