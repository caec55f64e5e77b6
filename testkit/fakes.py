"""Fakes for unit tests only: a DNS resolver answering from a dict, and a hand-held clock."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver


class FakeResolver:
    """Answers `resolve()` like dnspython's resolvers, from records the test adds."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.failing: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, qtype: str, text: str) -> None:
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(qtype), text)
        self.records.setdefault((name.lower().rstrip("."), qtype), []).append(rdata)

    def resolve(self, name: str, qtype: str, **_: object) -> list[Any]:
        name = str(name).lower().rstrip(".")
        self.queries.append((name, qtype))
        if any(name.endswith(suffix) for suffix in self.failing):
            raise dns.exception.Timeout()
        if (name, qtype) in self.records:
            return self.records[(name, qtype)]
        if any(n == name for n, _ in self.records):
            return []
        raise dns.resolver.NXDOMAIN()


class FakeAsyncResolver(FakeResolver):
    async def resolve(self, name: str, qtype: str, **kwargs: object) -> list[Any]:  # type: ignore[override]
        return FakeResolver.resolve(self, name, qtype, **kwargs)

    def lookup(self, name: str, qtype: str = "A") -> asyncio.Future[list[Any] | None]:
        """As AddressResolver's: the answer as a future, None for NXDOMAIN."""
        future: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(FakeResolver.resolve(self, name, qtype))
        except dns.resolver.NXDOMAIN:
            future.set_result(None)
        except dns.exception.DNSException as error:
            future.set_exception(error)
        return future


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
