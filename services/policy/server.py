"""The policy service on port 10023: policy-protocol connections in, engine decisions out."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from secumail import dns as secumail_dns
from secumail import tracking
from secumail.connections import ConnectionServer, IdleDeadline, read_loop, send
from secumail.greylist_store import GreylistStore, open_store
from secumail.limits import READ_SIZE
from secumail.logs import log_event
from secumail.netaddr import peer_name
from secumail.outbound import Held
from secumail.outbound_store import outbound_store
from secumail.protocols.policy import PolicyDecoder, PolicyProtocolError, encode_action
from secumail.settings import Settings
from services.policy.engine import TEMPORARY_FAILURE, Decision, PolicyEngine, decision_event

log = logging.getLogger("secumail.policy")

DECISIONS = Counter(
    "secumail_policy_decisions", "Policy decisions by deciding check and action kind",
    ["check", "action"],
)
LATENCY = Histogram(
    "secumail_policy_request_duration_seconds", "Time to answer one policy request",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
CHECK_ERRORS = Counter(
    "secumail_policy_check_errors", "Checks that failed (store or DNS trouble)", ["check"]
)
PROTOCOL_ERRORS = Counter(
    "secumail_policy_protocol_errors", "Connections closed for malformed or idle input", ["reason"]
)
GREYLIST_SCORES = Counter(
    "secumail_policy_greylist_scores",
    "Selective greylisting: recipients scored, by decision (greylisted or passed)", ["decision"],
)
GREYLIST_SIGNALS = Counter(
    "secumail_policy_greylist_signals",
    "Selective greylisting: the signals found in scored recipients", ["signal"],
)
OUTBOUND_HOLDS = Counter(
    "secumail_policy_outbound_holds", "Senders, clients or users held for sending far over "
    "their outbound limits", ["scope"],
)
OUTBOUND_HELD = Gauge(
    "secumail_policy_outbound_held", "Senders, clients and users held now (until the admin "
    "releases them): alert on it")
CONNECTIONS = Gauge("secumail_policy_connections", "Open policy connections")
GREYLIST_ENTRIES = Gauge("secumail_greylist_entries", "Triplets in the greylist store")

MAINTENANCE_INTERVAL = 60.0


@functools.lru_cache(maxsize=64)
def _decisions(check: str, kind: str) -> Counter:
    """The counter of one (check, kind): labels() takes a lock and checks its arguments."""
    return DECISIONS.labels(check, kind)


def _count_score(found: list[tuple[str, float]], greylisted: bool) -> None:
    _greylist_scores("greylisted" if greylisted else "passed").inc()
    for name, _ in found:
        _greylist_signals(name).inc()


@functools.lru_cache(maxsize=4)
def _greylist_scores(decision: str) -> Counter:
    return GREYLIST_SCORES.labels(decision)


@functools.lru_cache(maxsize=32)
def _greylist_signals(signal: str) -> Counter:
    return GREYLIST_SIGNALS.labels(signal)


class PolicyService:
    def __init__(self, settings: Settings, store: GreylistStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.greylist_store, settings.greylist_max_age,
                                         settings.redis_password_file,
                                         settings.greylist_retry_window)
        self.outbound = outbound_store(self.store) if settings.outbound else None
        self.engine = PolicyEngine(
            settings, self.store,
            secumail_dns.make_resolver(settings.dns_servers, settings.dns_timeout),
            secumail_dns.AddressResolver(settings.dns_servers, settings.dns_timeout),
            outbound_store=self.outbound,
        )
        self.engine.on_hold = self._held
        self.engine.on_check_error = lambda check: CHECK_ERRORS.labels(check).inc()
        self.engine.on_score = _count_score
        self.server = ConnectionServer(
            "policy", settings.policy_listen, self.handle, settings.policy_max_connections
        )
        self._maintenance: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._maintenance = asyncio.create_task(self._maintain())

    async def drain(self, timeout: float) -> None:
        await self.server.drain(timeout)
        if self._maintenance is not None:
            self._maintenance.cancel()
        self.engine.close()
        await self.store.close()

    async def _maintain(self) -> None:
        """Expire triplets that no longer count and publish the store size, once a minute."""
        while True:
            try:
                now = time.time()
                removed = await self.store.purge(now)
                GREYLIST_ENTRIES.set(await self.store.count())
                if self.outbound is not None:
                    await self.outbound.purge(now)
                    OUTBOUND_HELD.set(len(await self.outbound.holds()))
                if removed:
                    log_event(log, "expired greylist entries", removed=removed)
            except Exception as error:
                CHECK_ERRORS.labels("store").inc()
                log_event(log, "store maintenance failed", logging.WARNING, error=repr(error))
            await asyncio.sleep(MAINTENANCE_INTERVAL)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_text = peer_name(writer.get_extra_info("peername"))
        decoder = PolicyDecoder(
            self.settings.policy_max_line, self.settings.policy_max_attributes,
            self.settings.policy_strict_attributes,
        )

        async def received(data: bytes) -> bool:
            try:
                requests = decoder.feed(data)
            except PolicyProtocolError as error:
                self._drop(peer_text, "malformed", str(error))
                return False
            for request in requests:
                if writer.is_closing():
                    return False  # the client left: its other requests need no answer
                if request.get("request") != "smtpd_access_policy":
                    self._drop(peer_text, "malformed", "not an smtpd_access_policy request")
                    return False
                with self.server.inflight.track():
                    started = time.perf_counter()
                    decision = await self.answer(request)
                    await send(writer, encode_action(decision.action))
                    LATENCY.observe(time.perf_counter() - started)
            return True

        def ended() -> None:
            if decoder.pending:
                self._drop(peer_text, "truncated", "connection closed mid-request")

        CONNECTIONS.inc()
        try:
            # Postfix asks a closed policy connection's request again on a new one
            # (smtpd_policy_service_try_limit): a draining server hangs up between requests.
            await read_loop(
                reader, IdleDeadline(writer, self.settings.policy_idle_timeout,
                                     self.settings.request_timeout), READ_SIZE, received,
                mid_request=lambda: decoder.pending, ended=ended,
                idle_out=lambda reason: self._drop(peer_text, "idle", reason),
                stop=lambda: self.server.draining)
        finally:
            CONNECTIONS.dec()

    async def answer(self, request: dict[str, str]) -> Decision:
        try:
            decision = await self.engine.evaluate(request)
        except Exception:
            log.exception("policy engine failed")
            CHECK_ERRORS.labels("engine").inc()
            fallback = "DUNNO" if self.settings.policy_fail_open else TEMPORARY_FAILURE
            decision = Decision(fallback, "error", "internal error")
        _decisions(decision.check, decision.kind).inc()
        # Health probes ask at the VRFY stage (our Postfix never does: VRFY is off): a line
        # every 10 s per prober would bury the decisions.
        get = request.get  # each field read once, for the log line and the tracking event
        state, client = get("protocol_state", ""), get("client_address", "")
        sender, recipient, queue_id = get("sender", ""), get("recipient", ""), get("queue_id", "")
        probe = state == "VRFY"
        log_event(
            log, "decision", logging.DEBUG if probe else logging.INFO,
            action=decision.action, check=decision.check, reason=decision.reason, state=state,
            client=client, helo=get("helo_name", ""), sender=sender, recipient=recipient,
            queue_id=queue_id,
        )
        if not probe and tracking.EVENTS.enabled:  # decision_event's values, in its order
            tracking.record((decision_event, decision.check, decision.reason, decision.kind,
                             client, sender, recipient, queue_id, time.time()))
        return decision

    def _held(self, held: Held) -> None:
        OUTBOUND_HOLDS.labels(held.scope).inc()
        OUTBOUND_HELD.inc()  # until the next maintenance round counts them again

    def _drop(self, peer: str, reason: str, detail: str) -> None:
        PROTOCOL_ERRORS.labels(reason).inc()
        log_event(log, "closing connection", logging.WARNING, peer=peer, reason=detail)

