"""The policy engine: one request in, one decision out. No sockets here.

At RCPT time the checks run cheapest-verdict-first: DNSBL (reject a listed client), SPF
(reject a forged sender), greylisting (defer an unknown triplet; in selective mode only a
client whose signals score at the threshold). Every DNS lookup a request needs is asked at
once, before the first check, so a request waits for the slowest answer, not their sum.
Postfix allows a single
action per answer, so the two headers are added at different stages: X-Greylist with the
RCPT answer that lets a delayed triplet through, Received-SPF with the DATA answer (the
Postfix config asks the service again from smtpd_data_restrictions).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.resolver

from secumail import outbound, spf, tracking
from secumail.dns import AddressLookup, AddressResolver, TtlCache, name_resolves
from secumail.greylist_store import GreylistStore, Triplet, record_pass, triplet_key
from secumail.logs import log_event
from secumail.netaddr import IPAddress, client_network, parse_ip
from secumail.outbound_store import OutboundStore
from secumail.protocols.policy import PolicyRequest
from secumail.settings import Settings
from services.policy import dnsbl, signals
from services.policy.greylist import (
    ClientWhitelist,
    GreylistConfig,
    RecipientWhitelist,
    check_triplet,
    client_is_whitelisted,
    greylist_header,
    split_whitelists,
)

log = logging.getLogger("secumail.policy")

TEMPORARY_FAILURE = "DEFER_IF_PERMIT 4.7.1 Service temporarily unavailable, please retry later"


@dataclass(frozen=True)
class Decision:
    action: str  # what follows "action=" in the answer
    check: str  # which check decided: dnsbl, spf, greylist, trusted, protocol, none
    reason: str  # for the log line

    @functools.cached_property
    def kind(self) -> str:
        """A small fixed set, for metric labels: dunno, prepend, defer, tempfail, reject.
        (Worked out once: the metrics, the log and the tracking event all ask.)"""
        word = self.action.split(" ", 1)[0].upper()
        if word.startswith("4"):
            return "tempfail"
        if word.startswith("5") or word == "REJECT":
            return "reject"
        return {"DEFER_IF_PERMIT": "defer", "PREPEND": "prepend"}.get(word, "dunno")


def decision_event(answer: tracking.Pending) -> tracking.Event:
    """The tracking event of one answer: greylisted, deferred (a check unavailable),
    refused, or passed (with what was prepended, X-Greylist's "not delayed" included).
    `answer` is what the server recorded at the answer (PolicyService.answer), in this
    order; the event is made from it when events are served, not at every answer
    (tracking.Pending)."""
    _, check, reason, kind, client, sender, recipient, queue_id, at = answer
    if kind in ("tempfail", "defer"):
        outcome = "greylisted" if check == "greylist" else "deferred"
    else:
        outcome = "refused" if kind == "reject" else "passed"
    cut = tracking.MAX_FIELD
    return tracking.new_event((
        "policy", outcome, (f"{check}: {reason}" if reason else check)[:cut], client[:cut],
        sender[:cut], (recipient[:cut],) if recipient else (),
        tracking.queue_id_value(queue_id) if queue_id else "", "", "", at))


DUNNO = Decision("DUNNO", "none", "no check objected")


class _Lookups:
    """The DNS questions of one request, asked at once; each check awaits the answer it
    needs. Those no check awaited (a DNSBL rejection came first) are cancelled. DNS lists
    are asked without a task (their answers are futures the resolver ends), and an answer
    known already (a cached HELO) is kept as it is."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Future[Any]] = {}
        self._lists: dict[str, dnsbl.ListQueries] = {}
        self._known: dict[str, Any] = {}

    def ask(self, name: str, question: Coroutine[Any, Any, Any]) -> None:
        self._tasks[name] = asyncio.ensure_future(question)

    def ask_lists(self, name: str, queries: dnsbl.ListQueries) -> None:
        self._lists[name] = queries

    def know(self, name: str, answer: Any) -> None:
        self._known[name] = answer

    def asked(self, name: str) -> bool:
        return name in self._tasks or name in self._lists or name in self._known

    async def answer(self, name: str) -> Any:
        if name in self._known:
            return self._known[name]
        queries = self._lists.get(name)
        if queries is not None:
            return await queries.listed()
        return await self._tasks[name]

    async def close(self) -> None:
        for queries in self._lists.values():
            queries.cancel()
        if not self._tasks:
            return
        for task in self._tasks.values():
            task.cancel()
        # Collects the exceptions of the answers nobody awaited (else asyncio logs them).
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


@dataclass
class _Transaction:
    """What the engine remembers of one SMTP transaction (Postfix's `instance`)."""

    spf: spf.SpfOutcome | None = None
    greylist_header_added: bool = False
    outbound_counted: bool = False  # the message counted against the outbound limits


class PolicyEngine:
    TRANSACTIONS_KEPT = 10000
    HELO_TTL = 300.0
    # Whitelist entries added at run time (the gateway's admin API) are read back from the
    # store this often, not once per request.
    WHITELIST_REFRESH = 5.0

    def __init__(
        self,
        settings: Settings,
        store: GreylistStore,
        resolver: dns.resolver.Resolver,
        async_resolver: AddressLookup,
        clock: Callable[[], float] = time.time,
        outbound_store: OutboundStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.outbound_limits = settings.outbound
        self.outbound_store = outbound_store
        # Metrics: a subject just held (the admin must be told).
        self.on_hold: Callable[[outbound.Held], None] = lambda held: None
        self.async_resolver = async_resolver
        self.clock = clock
        self.greylist = GreylistConfig(
            delay=settings.greylist_delay,
            retry_window=settings.greylist_retry_window,
            max_age=settings.greylist_max_age,
            auto_whitelist=settings.greylist_auto_whitelist,
        )
        self.client_whitelist = ClientWhitelist(settings.greylist_whitelist_clients)
        # The gateway's canaries go to the probe mailbox: greylisting them would only
        # delay every chain probe (postgrey spares postmaster@ by default too).
        self.recipient_whitelist = RecipientWhitelist(
            [*settings.greylist_whitelist_recipients, settings.probe_address]
        )
        self._runtime_whitelists = split_whitelists([])
        self._runtime_loaded = float("-inf")
        self.dnsbl_weights = dict(settings.weighted_dnsbl_zones)
        self._dnsbl_zones = list(self.dnsbl_weights)
        self.selective = settings.greylist_mode == "selective"
        self.signal_weights = settings.signal_weights
        self.dnswl_weights = dict(settings.weighted_dnswl_zones)
        self._dnswl_zones = list(self.dnswl_weights)
        # Whether a HELO name resolves, for the helo-unresolved signal: a sending MTA says
        # the same HELO in every session, so it is asked once per HELO_TTL.
        self._helo_names: TtlCache[str, bool] = TtlCache(10000)
        self.known_senders = frozenset(settings.greylist_known_senders)
        # Metrics: the signals found for one scored client, and whether it was greylisted.
        self.on_score: Callable[[list[tuple[str, float]], bool], None] = lambda found, grey: None
        self._transactions: OrderedDict[str, _Transaction] = OrderedDict()  # LRU
        self.spf = spf.SpfChecker(resolver, settings.hostname, settings.dns_timeout * 3)
        self.on_check_error: Callable[[str], None] = lambda check: None
        # The checks this configuration runs at RCPT time, cheapest verdict first.
        Step = Callable[[PolicyRequest, IPAddress, _Lookups], Awaitable[Decision | None]]
        checks: list[tuple[str, bool, Step]] = [
            ("dnsbl", bool(self.dnsbl_weights), self._check_dnsbl),
            ("spf", settings.spf_enabled, self._check_spf),
            ("greylist", settings.greylist_enabled, self._check_greylist),
        ]
        self._steps = [(name, step) for name, enabled, step in checks if enabled]

    async def evaluate(self, request: PolicyRequest) -> Decision:
        state = request.get("protocol_state", "").upper()
        if state == "RCPT":
            return await self._recipient_stage(request)
        if state in ("DATA", "END-OF-MESSAGE"):
            return await self._data_stage(request)
        return Decision("DUNNO", "none", f"nothing to check at {state or 'unknown'} stage")

    async def _recipient_stage(self, request: PolicyRequest) -> Decision:
        ip = parse_ip(request.get("client_address", ""))
        if ip is None:
            return Decision("DUNNO", "none", "no client address to check")
        user = self._trusted_user(request)
        if user or self.settings.in_mynetworks(ip):
            return await self._check_outbound(request, ip, user)
        lookups = self._ask_dns(request, ip)
        try:
            for name, step in self._steps:
                try:
                    decision = await step(request, ip, lookups)
                except Exception as error:
                    failure = self._failure(name, error)
                    if failure is not None:
                        return failure
                    continue
                if decision is not None:
                    return decision
            return DUNNO
        finally:
            await lookups.close()

    def _trusted_user(self, request: PolicyRequest) -> str:
        """The authenticated user, if trusted. Postfix sends sasl_username only when it
        offers SMTP AUTH, which SecuMail's does not: a name there is trusted only when the
        admin says their Postfix checked it (SECUMAIL_POLICY_TRUST_SASL)."""
        return request.get("sasl_username", "") if self.settings.policy_trust_sasl else ""

    async def _check_outbound(
        self, request: PolicyRequest, ip: IPAddress, user: str
    ) -> Decision:
        """Our own hosts and users: counted against the outbound limits, nothing else."""
        who = "authenticated sender" if user else "client in mynetworks"
        if not self.outbound_limits or self.outbound_store is None:
            return Decision("DUNNO", "trusted", who)
        transaction = self._transaction(request)
        found = outbound.subjects(str(ip), request.get("sender", ""), user)
        new_message = not transaction.outbound_counted
        limits = outbound.buckets(self.outbound_limits, found, new_message)
        factor = self.settings.outbound_hold_factor
        tries = outbound.buckets(self.outbound_limits, found, new_message, True, factor) \
            if factor else []
        try:
            charged = await self.outbound_store.charge(
                limits, tries, [outbound.subject_text(*subject) for subject in found])
        except Exception as error:
            failure = self._failure("outbound", error)
            return failure if failure is not None else Decision("DUNNO", "trusted", who)
        # One hold a subject (several of its limits may overflow), none if held already.
        newly = {b.subject: b for b in charged.overflowed if b.subject != charged.held}
        for bucket in newly.values():
            held = outbound.Held(bucket.subject, self.clock(),
                                 outbound.hold_reason(bucket, factor))
            if await self.outbound_store.hold(held):
                self.on_hold(held)
                log_event(log, "outbound sender held", logging.WARNING,
                          subject=held.subject, reason=held.reason)
        if charged.overflowed or charged.held:
            subject = charged.held or charged.overflowed[0].subject
            return Decision(outbound.held_refusal(subject), "outbound", f"{subject} held")
        if charged.over is not None:
            limit, subject = charged.over.limit, charged.over.subject
            return Decision(outbound.refusal(limit, subject), "outbound",
                            f"{subject} over {limit.text}")
        transaction.outbound_counted = True
        return Decision("DUNNO", "trusted", f"{who}, within the outbound limits")

    def _ask_dns(self, request: PolicyRequest, ip: IPAddress) -> _Lookups:
        lookups = _Lookups()
        reversed_name = dnsbl.reversed_address(ip)
        if self.dnsbl_weights:
            lookups.ask_lists("dnsbl", dnsbl.ListQueries(self.async_resolver, reversed_name,
                                                         self._dnsbl_zones))
        if self.settings.spf_enabled:
            lookups.ask("spf", self._spf_outcome(request))
        if self.settings.greylist_enabled and self.selective:
            helo = request.get("helo_name", "")
            if self.signal_weights.get("helo-unresolved") and not signals.is_address_literal(helo):
                resolves = self._helo_names.get(helo.lower())
                if resolves is None:
                    lookups.ask("helo", self._helo_resolves(helo))
                else:
                    lookups.know("helo", resolves)
            if self.dnswl_weights and self.signal_weights.get("dnswl"):
                lookups.ask_lists("dnswl", dnsbl.ListQueries(
                    self.async_resolver, reversed_name, self._dnswl_zones))
        return lookups

    async def _helo_resolves(self, helo: str) -> bool:
        resolves = await name_resolves(self.async_resolver, helo)
        self._helo_names.put(helo.lower(), resolves, self.HELO_TTL)
        return resolves

    def _failure(self, check: str, error: Exception) -> Decision | None:
        """A broken store or DNS: defer the mail, or skip the check when failing open."""
        self.on_check_error(check)
        log_event(
            log, "check failed", logging.WARNING, check=check,
            error=f"{type(error).__name__}: {error}",
            outcome="skipped (fail open)" if self.settings.policy_fail_open else "deferred",
        )
        if self.settings.policy_fail_open:
            return None
        return Decision(TEMPORARY_FAILURE, check, f"{check} unavailable: {type(error).__name__}")

    async def _check_dnsbl(
        self, request: PolicyRequest, ip: IPAddress, lookups: _Lookups
    ) -> Decision | None:
        client = str(ip)
        listed = await lookups.answer("dnsbl")
        rejected, score, hits = dnsbl.dnsbl_verdict(
            listed, self.dnsbl_weights, self.settings.dnsbl_threshold
        )
        if not rejected:
            return None
        names = ", ".join(hits)
        return Decision(
            f"554 5.7.1 Service unavailable; client [{client}] blocked using {names}",
            "dnsbl", f"listed by {names} (score {score:g})",
        )

    async def _spf_outcome(self, request: PolicyRequest) -> spf.SpfOutcome:
        transaction = self._transaction(request)
        if transaction.spf is None:
            transaction.spf = await self.spf.check(
                request.get("client_address", ""), request.get("sender", ""),
                request.get("helo_name", ""))
        return transaction.spf

    async def _check_spf(
        self, request: PolicyRequest, ip: IPAddress, lookups: _Lookups
    ) -> Decision | None:
        outcome = await lookups.answer("spf")
        action = spf.spf_action(outcome, self.settings.spf_reject_fail)
        if action is None:
            return None
        return Decision(action, "spf", f"spf={outcome.result}")

    async def _check_greylist(
        self, request: PolicyRequest, ip: IPAddress, lookups: _Lookups
    ) -> Decision | None:
        recipient = request.get("recipient", "")
        now = self.clock()
        if now - self._runtime_loaded >= self.WHITELIST_REFRESH or now < self._runtime_loaded:
            self._runtime_whitelists = split_whitelists(await self.store.whitelist())
            self._runtime_loaded = now
        for clients, recipients in (
            (self.client_whitelist, self.recipient_whitelist), self._runtime_whitelists
        ):
            if clients.matches(ip, request.get("client_name", "")):
                return None
            if recipients.matches(recipient):
                return None
        network = client_network(ip)
        key = triplet_key(network, request.get("sender", ""), recipient)
        client, entry = await self.store.lookup(network, key)
        # Whether this pass would count (at most one an hour): decided on what the lookup
        # read, so that most requests cost no write; the store decides again, atomically.
        counts = record_pass(client, now, self.greylist.max_age) is not None
        if client_is_whitelisted(client, now, self.greylist):
            if counts:
                await self.store.count_pass(network, now)  # keeps the whitelisting fresh
            await self._got_through(key, entry, now)
            return None
        found: list[tuple[str, float]] = []
        if self.selective:
            passed_before = client is not None and now - client.last_seen <= self.greylist.max_age
            found = await self._signals(request, ip, lookups, passed_before)
            below = signals.score(found) < self.settings.greylist_threshold
            self.on_score(found, not below)
            if below:
                await self._got_through(key, entry, now)
                return self._not_delayed(request, found, now)
        verdict = check_triplet(entry, now, self.greylist)
        await self.store.put(key, verdict.entry)
        if verdict.defer:
            wait = math.ceil(verdict.retry_in)
            why = f", {signals.describe(found)}" if self.selective else ""
            return Decision(
                f"DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in {wait} seconds",
                "greylist", f"new or too early triplet{why}",
            )
        if verdict.delayed is None:
            return None
        if counts:
            await self.store.count_pass(network, now)
        transaction = self._transaction(request)
        if transaction.greylist_header_added:
            return None
        transaction.greylist_header_added = True
        why = signals.describe(found) if self.selective else ""
        header = greylist_header(verdict.delayed, self.settings.hostname, now, why)
        return Decision(f"PREPEND {header}", "greylist",
                        "retried after the delay" + (f", {why}" if why else ""))

    async def _got_through(self, key: str, entry: Triplet | None, now: float) -> None:
        """A triplet greylisted before that now gets through another way (its client was
        whitelisted meanwhile, or scores below the threshold now) is marked passed, so that
        the admin's list does not show it waiting for ever. One write, in that case only."""
        if entry is not None and not entry.passed:
            await self.store.put(key, Triplet(entry.first_seen, now, passed=True))

    def _not_delayed(
        self, request: PolicyRequest, found: list[tuple[str, float]], now: float
    ) -> Decision | None:
        """Selective greylisting let this client through: say so, once per transaction."""
        transaction = self._transaction(request)
        if transaction.greylist_header_added:
            return None
        transaction.greylist_header_added = True
        why = signals.describe(found)
        header = greylist_header(None, self.settings.hostname, now, why)
        return Decision(f"PREPEND {header}", "greylist", f"not greylisted, {why}")

    async def _signals(
        self, request: PolicyRequest, ip: IPAddress, lookups: _Lookups, passed_before: bool
    ) -> list[tuple[str, float]]:
        """Gather what the signals need from the answers asked for at the start."""
        listed = await self._optional(lookups, "dnsbl", {})
        whitelisted = await self._optional(lookups, "dnswl", {})
        outcome = await self._optional(lookups, "spf", None)
        sender = request.get("sender", "")
        facts = signals.ClientFacts(
            address=ip,
            reverse_name=request.get("reverse_client_name", "unknown"),
            verified_name=request.get("client_name", "unknown"),
            helo=request.get("helo_name", ""),
            helo_resolves=await self._optional(lookups, "helo", None),
            dnsbl_score=sum(self.dnsbl_weights[z] for z, hit in listed.items() if hit),
            dnswl_score=sum(self.dnswl_weights[z] for z, hit in whitelisted.items() if hit),
            spf_result=outcome.result if outcome is not None else "",
            sender_domain=sender.rpartition("@")[2].lower() if "@" in sender else "",
            known_senders=self.known_senders,
            passed_before=passed_before,
        )
        return signals.signals(facts, self.signal_weights)

    async def _optional(self, lookups: _Lookups, name: str, unknown: Any) -> Any:
        """An answer a signal needs; when DNS failed and the service fails open, the signal
        is left out (`unknown`); failing closed, the failure defers the mail."""
        if not lookups.asked(name):
            return unknown
        try:
            return await lookups.answer(name)
        except Exception:
            if self.settings.policy_fail_open:
                return unknown
            raise

    async def _data_stage(self, request: PolicyRequest) -> Decision:
        """Add Received-SPF once the recipients are known and the message is coming."""
        ip = parse_ip(request.get("client_address", ""))
        trusted = self.settings.in_mynetworks(ip) or self._trusted_user(request)
        if not self.settings.spf_enabled or trusted:
            return Decision("DUNNO", "none", "no header to add")
        try:
            outcome = await self._spf_outcome(request)
        except Exception as error:
            # The recipients were accepted already; a missing header is no reason to defer.
            self.on_check_error("spf")
            log_event(log, "no Received-SPF header", logging.WARNING, error=repr(error))
            return Decision("DUNNO", "spf", "SPF lookup failed at DATA")
        return Decision(f"PREPEND Received-SPF: {outcome.header}", "spf", f"spf={outcome.result}")

    def _transaction(self, request: PolicyRequest) -> _Transaction:
        """State per SMTP transaction, kept for the last few thousand (bounded memory)."""
        instance = request.get("instance", "")
        if not instance:
            return _Transaction()
        # The SPF result belongs to client, sender and HELO: they are part of the key.
        identity = (request.get(k, "") for k in ("client_address", "sender", "helo_name"))
        key = "|".join((instance, *identity))
        transaction = self._transactions.get(key)
        if transaction is None:
            transaction = self._transactions[key] = _Transaction()
            if len(self._transactions) > self.TRANSACTIONS_KEPT:
                self._transactions.popitem(last=False)
        return transaction

    def close(self) -> None:
        self.spf.close()
        if isinstance(self.async_resolver, AddressResolver):
            self.async_resolver.close()
