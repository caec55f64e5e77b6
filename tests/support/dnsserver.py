"""A DNS server the tests start on loopback, so that no SPF, DKIM or DNSBL lookup leaves
the machine. Records are added by the test; names under `slow_suffixes` never get an answer
(the client times out), which is how tests make DNS fail."""

from __future__ import annotations

import threading
import time

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
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

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.resolver = ZoneResolver()
        self.server = DNSServer(self.resolver, port=port, address=host, logger=_Quiet())
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


class _Quiet:
    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None
