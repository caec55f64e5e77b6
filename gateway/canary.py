"""The chain probe: a canary message through the whole chain, to the probe mailbox.

The gateway hands Postfix a small message over SMTP, as any client would (null sender by
default, a HELO name without SPF record), to the probe mailbox, which the policy service
never greylists. It then asks the Postfix container's agent (exporter.py) for the canary's
headers until it lands, checks that each hop added its header, and removes it. The
end-to-end time runs from the start of the SMTP session to the delivery (the mail file's
time), so the polling interval does not blur it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import Any

import httpx2
from prometheus_client import CollectorRegistry, Counter, Gauge

from secumail.chain import PROBE_HEADER, chain
from secumail.logs import log_event
from secumail.protocols.smtp import Envelope, NextHop, SmtpRefused, SmtpUnavailable, deliver
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

POLL_INTERVAL = 0.25

# (token, time) -> Postfix's answer to the end of DATA; raises ValueError when refused.
CanarySend = Callable[[str, float], Awaitable[str]]


def expected_headers(settings: Settings) -> dict[str, str]:
    """Hop -> the header it adds to every message it passes (given these settings)."""
    return {hop.service: hop.header for hop in chain(settings) if hop.header}


@dataclass
class ProbeOutcome:
    ok: bool
    token: str
    started_at: float
    finished_at: float
    recipient: str
    queued: str = ""  # Postfix's answer to the end of DATA
    delivered_at: float | None = None
    end_to_end_seconds: float | None = None
    headers: dict[str, bool] = field(default_factory=dict)  # hop -> its header was there
    error: str | None = None

    @property
    def missing(self) -> list[str]:
        return [hop for hop, present in self.headers.items() if not present]


class ProbeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.success = Gauge("secumail_chain_probe_success",
                             "1 when the last chain probe went through with every header",
                             registry=registry)
        self.duration = Gauge("secumail_chain_probe_duration_seconds",
                              "End-to-end time of the last chain probe that arrived",
                              registry=registry)
        self.last_run = Gauge("secumail_chain_probe_last_run_timestamp_seconds",
                              "When the last chain probe ended", registry=registry)
        self.runs = Counter("secumail_chain_probe_runs", "Chain probes by result", ["result"],
                            registry=registry)
        self.header = Gauge("secumail_chain_probe_header_present",
                            "1 when the last canary carried this hop's header", ["hop"],
                            registry=registry)

    def record(self, outcome: ProbeOutcome) -> None:
        self.success.set(1 if outcome.ok else 0)
        self.last_run.set(outcome.finished_at)
        self.runs.labels("ok" if outcome.ok else "failed").inc()
        if outcome.end_to_end_seconds is not None:
            self.duration.set(outcome.end_to_end_seconds)
        for hop, present in outcome.headers.items():
            self.header.labels(hop).set(1 if present else 0)


def canary_message(token: str, settings: Settings, now: float) -> bytes:
    # The null sender's From: the HELO domain (no DMARC policy there to fail).
    sender = settings.probe_sender or f"probe@{settings.probe_helo}"
    lines = [
        f"From: SecuMail chain probe <{sender}>",
        f"To: <{settings.probe_address}>",
        f"Subject: SecuMail chain probe {token[:8]}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {make_msgid('probe', settings.probe_helo)}",
        f"{PROBE_HEADER}: {token}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This message tests the SecuMail chain; the gateway removes it on arrival.",
        "",
    ]
    return "\r\n".join(lines).encode()


class ChainProbe:
    def __init__(
        self, settings: Settings, client: httpx2.AsyncClient, metrics: ProbeMetrics,
        clock: Callable[[], float] = time.time, send: CanarySend | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.send = send or self._send
        self.agent = (f"http://{settings.postfix_address.host}:"
                      f"{settings.metrics_listen.port}/probe/")
        self.last: ProbeOutcome | None = None
        self._lock = asyncio.Lock()

    async def run(self) -> ProbeOutcome:
        """One probe at a time: a request during a probe waits for the next one's result."""
        async with self._lock:
            outcome = await self._probe()
        self.last = outcome
        self.metrics.record(outcome)
        log_event(log, "chain probe", logging.INFO if outcome.ok else logging.WARNING,
                  ok=outcome.ok, seconds=outcome.end_to_end_seconds,
                  missing=",".join(outcome.missing), error=outcome.error or "")
        return outcome

    async def _probe(self) -> ProbeOutcome:
        token = secrets.token_hex(16)
        started = self.clock()
        outcome = ProbeOutcome(False, token, started, started, self.settings.probe_address)
        try:
            outcome.queued = await self.send(token, started)
            found = await self._wait_for(token, started + self.settings.probe_timeout)
        except (SmtpUnavailable, httpx2.HTTPError, ValueError) as error:
            outcome.error = str(error) or type(error).__name__
        else:
            if found is None:
                outcome.error = (f"not in {self.settings.probe_address} after "
                                 f"{self.settings.probe_timeout:g} s")
            else:
                names = {str(name).lower() for name, _ in found["headers"]}
                outcome.headers = {hop: header.lower() in names
                                   for hop, header in expected_headers(self.settings).items()}
                outcome.delivered_at = float(found["delivered_at"])
                outcome.end_to_end_seconds = max(0.0, outcome.delivered_at - started)
                outcome.ok = not outcome.missing
                if outcome.missing:
                    outcome.error = "no header from " + ", ".join(outcome.missing)
        outcome.finished_at = self.clock()
        return outcome

    async def _send(self, token: str, now: float) -> str:
        envelope = Envelope(self.settings.probe_sender, (self.settings.probe_address,))
        try:
            queued = await deliver(NextHop(self.settings.postfix_address),
                                   self.settings.probe_helo, envelope,
                                   canary_message(token, self.settings, now),
                                   self.settings.gateway_timeout)
        except SmtpRefused as refused:
            raise ValueError(f"Postfix refused {refused.step}: {refused.reply}") from None
        if not queued.ok:
            raise ValueError(f"Postfix refused the canary: {queued}")
        return str(queued)

    async def _wait_for(self, token: str, deadline: float) -> dict[str, Any] | None:
        url = self.agent + token
        while True:
            response = await self.client.get(url, timeout=self.settings.gateway_timeout)
            if response.status_code == 200:
                found: dict[str, Any] = response.json()  # token, delivered_at, headers
                await self.client.delete(url, timeout=self.settings.gateway_timeout)
                return found
            if response.status_code != 404:
                response.raise_for_status()
            if self.clock() >= deadline:
                return None
            await asyncio.sleep(POLL_INTERVAL)

    async def every(self, interval: float, first: float) -> None:
        """The periodic probe (a background task of the app): after `first` seconds, then
        every `interval`."""
        await asyncio.sleep(first)
        while True:
            try:
                await self.run()
            except Exception:
                log.exception("chain probe failed")
            await asyncio.sleep(interval)
