"""Health of every hop of the chain, replica by replica.

A hop is a service address from the settings (`clamav:10025`); a compose service name
resolves to every replica's address, and each replica gets the probe a healthy one answers
(secumail.probes). A hop is ready when it resolves and every replica answers. A round of
probes is shared by the requests that arrive while it runs, and reused for `max_age`
seconds, so that a busy /readyz or Prometheus cannot turn into a probe storm.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from secumail import probes
from secumail.chain import chain
from secumail.netaddr import parse_host_port
from secumail.settings import Settings

ProbeFn = Callable[[str, float], Awaitable[str]]
Resolver = Callable[[str], Awaitable[list[str]]]
Namer = Callable[[str], Awaitable[str | None]]

NAME_TTL = 60.0  # seconds a replica's reverse-DNS name is kept (IPs are reused)


@dataclass(frozen=True)
class Hop:
    service: str  # the compose service name, and the `service` label of its metrics
    address: str  # host:port from the settings, or a unix socket path
    check: str  # what the probe does, for people reading /health
    probe: ProbeFn
    metrics: bool  # whether its replicas serve /metrics on the metrics port


def chain_hops(settings: Settings) -> list[Hop]:
    """The chain in mail order (secumail/chain.py), each hop with its probe."""
    hops = []
    for hop in chain(settings):
        probe, check = probes.PROBES[hop.probe]
        hops.append(Hop(hop.service, hop.address, check, probe, hop.metrics))
    return hops


@dataclass
class ReplicaState:
    """What the gateway knows of one replica; the last error stays after it recovered."""

    instance: str  # ip:port probed (or the socket path)
    status: str = "unknown"  # ok, failing
    name: str | None = None  # the container's name, from reverse DNS
    latency_seconds: float | None = None
    answer: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok_at: float | None = None

    @property
    def host(self) -> str:
        return parse_host_port(self.instance).host if not self.instance.startswith("/") else ""


@dataclass
class HopResult:
    hop: Hop
    replicas: list[ReplicaState] = field(default_factory=list)
    error: str | None = None  # the name did not resolve

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.replicas) and all(
            r.status == "ok" for r in self.replicas
        )

    @property
    def problem(self) -> str:
        """One line naming what is broken, for /readyz."""
        if self.error:
            return self.error
        if not self.replicas:
            return "no replica"
        return "; ".join(f"{r.name or r.instance}: {r.last_error}" for r in self.replicas
                         if r.status != "ok")


async def reverse_name(ip: str) -> str | None:
    """A replica's container name: Docker's DNS answers `project_service_1.network`."""
    try:
        async with asyncio.timeout(1.0):
            host, _ = await asyncio.get_running_loop().getnameinfo((ip, 0), socket.NI_NAMEREQD)
    except (OSError, TimeoutError):
        return None
    return host.split(".")[0] if host != ip else None


class HealthChecker:
    def __init__(
        self, hops: list[Hop], timeout: float, resolve: Resolver = probes.replicas,
        namer: Namer = reverse_name, clock: Callable[[], float] = time.time,
    ) -> None:
        self.hops = hops
        self.timeout = timeout
        self.resolve = resolve
        self.namer = namer
        self.clock = clock
        self.last: list[HopResult] = []
        self.checked_at = float("-inf")
        self._states: dict[tuple[str, str], ReplicaState] = {}
        self._names: dict[str, tuple[str | None, float]] = {}
        self._round: asyncio.Task[list[HopResult]] | None = None

    async def check(self, max_age: float = 0.0) -> list[HopResult]:
        """The latest round if younger than `max_age` seconds, else a new one (shared)."""
        if self.last and self.clock() - self.checked_at < max_age:
            return self.last
        # shield: a client that hangs up must not cancel the round the others wait for.
        return await asyncio.shield(self._start_round())

    async def latest(self, max_age: float) -> list[HopResult]:
        """The latest round at once, refreshed in the background when older than `max_age`
        (for /metrics: a hanging hop must not make Prometheus's scrape time out)."""
        if not self.last:
            return await self.check()
        if self.clock() - self.checked_at >= max_age:
            self._start_round()
        return self.last

    def _start_round(self) -> asyncio.Task[list[HopResult]]:
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._run_round())
        return self._round

    async def _run_round(self) -> list[HopResult]:
        results = list(await asyncio.gather(*(self._check_hop(hop) for hop in self.hops)))
        self.last, self.checked_at = results, self.clock()
        return results

    async def _check_hop(self, hop: Hop) -> HopResult:
        try:
            async with asyncio.timeout(self.timeout):
                instances = await self.resolve(hop.address)
        except (OSError, TimeoutError, ValueError) as error:
            return HopResult(hop, error=f"cannot resolve {hop.address}: {_describe(error)}")
        # Forget replicas that are gone (scaled down), keep the others' history.
        for key in [k for k in self._states if k[0] == hop.service and k[1] not in instances]:
            del self._states[key]
        replicas = await asyncio.gather(*(self._check_replica(hop, i) for i in instances))
        return HopResult(hop, list(replicas))

    async def _check_replica(self, hop: Hop, instance: str) -> ReplicaState:
        state = self._states.setdefault((hop.service, instance), ReplicaState(instance))
        started = time.perf_counter()
        try:
            state.answer = await hop.probe(instance, self.timeout)
        except Exception as error:  # whatever a replica does to a probe, it is that replica's
            state.status, state.answer = "failing", None
            state.last_error = _describe(error) + await asyncio.to_thread(status_note, instance)
            state.last_error_at = self.clock()
        else:
            state.status, state.last_ok_at = "ok", self.clock()
        state.latency_seconds = time.perf_counter() - started
        if state.host:
            state.name = await self._name(state.host)
        return replace(state)  # a snapshot: the next round must not change this one's results

    async def _name(self, ip: str) -> str | None:
        cached = self._names.get(ip)
        if cached is not None and self.clock() - cached[1] < NAME_TTL:
            return cached[0]
        name = await self.namer(ip)
        self._names[ip] = (name, self.clock())
        return name


def status_note(instance: str) -> str:
    """For a daemon on a unix socket: what it wrote in `status` beside its socket while it
    cannot serve (clamd waiting for signatures says why there), or nothing."""
    if not instance.startswith("/"):
        return ""
    try:
        text = (Path(instance).parent / "status").read_text(errors="replace")[:500].strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
