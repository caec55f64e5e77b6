"""The policy engine: one request in, one decision out. No sockets here.

At RCPT time the checks run cheapest-verdict-first: DNSBL (reject a listed client), SPF
(reject a forged sender), greylisting (defer an unknown triplet). Postfix allows a single
action per answer, so the two headers are added at different stages: X-Greylist with the
RCPT answer that lets a delayed triplet through, Received-SPF with the DATA answer (the
Postfix config asks the service again from smtpd_data_restrictions).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.resolver

from secumail import spf
from secumail.logs import log_event
from secumail.netaddr import IPAddress, client_network, parse_ip
from secumail.protocols.policy import PolicyRequest
from secumail.settings import Settings
from services.policy import dnsbl
from services.policy.greylist import (
    ClientWhitelist,
    GreylistConfig,
    RecipientWhitelist,
    check_triplet,
    client_is_whitelisted,
    greylist_header,
    record_pass,
    split_whitelists,
    triplet_key,
)
from services.policy.stores import GreylistStore

log = logging.getLogger("secumail.policy")

TEMPORARY_FAILURE = "DEFER_IF_PERMIT 4.7.1 Service temporarily unavailable, please retry later"


@dataclass(frozen=True)
class Decision:
    action: str  # what follows "action=" in the answer
    check: str  # which check decided: dnsbl, spf, greylist, trusted, protocol, none
    reason: str  # for the log line

    @property
    def kind(self) -> str:
        """A small fixed set, for metric labels: dunno, prepend, defer, tempfail, reject."""
        word = self.action.split(" ", 1)[0].upper()
        if word.startswith("4"):
            return "tempfail"
        if word.startswith("5") or word == "REJECT":
            return "reject"
        return {"DEFER_IF_PERMIT": "defer", "PREPEND": "prepend"}.get(word, "dunno")


DUNNO = Decision("DUNNO", "none", "no check objected")


@dataclass
class _Transaction:
    """What the engine remembers of one SMTP transaction (Postfix's `instance`)."""

    spf: spf.SpfOutcome | None = None
    greylist_header_added: bool = False


class PolicyEngine:
    TRANSACTIONS_KEPT = 10000
    # Whitelist entries added at run time (the gateway's admin API) are read back from the
    # store this often, not once per request.
    WHITELIST_REFRESH = 5.0

    def __init__(
        self,
        settings: Settings,
        store: GreylistStore,
        resolver: dns.resolver.Resolver,
        async_resolver: dns.asyncresolver.Resolver,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
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
        self._transactions: OrderedDict[str, _Transaction] = OrderedDict()  # LRU
        self.spf = spf.SpfChecker(resolver, settings.hostname, settings.dns_timeout * 3)
        self.on_check_error: Callable[[str], None] = lambda check: None
        # The checks this configuration runs at RCPT time, cheapest verdict first.
        Step = Callable[[PolicyRequest, IPAddress], Awaitable[Decision | None]]
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
        if self.settings.in_mynetworks(ip):
            return Decision("DUNNO", "trusted", "client in mynetworks")
        if request.get("sasl_username"):
            return Decision("DUNNO", "trusted", "authenticated sender")
        for name, step in self._steps:
            try:
                decision = await step(request, ip)
            except Exception as error:
                failure = self._failure(name, error)
                if failure is not None:
                    return failure
                continue
            if decision is not None:
                return decision
        return DUNNO

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

    async def _check_dnsbl(self, request: PolicyRequest, ip: IPAddress) -> Decision | None:
        client = str(ip)
        zones = list(self.dnsbl_weights)
        listed = await dnsbl.lookup_all(self.async_resolver, client, zones)
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

    async def _check_spf(self, request: PolicyRequest, ip: IPAddress) -> Decision | None:
        outcome = await self._spf_outcome(request)
        action = spf.spf_action(outcome, self.settings.spf_reject_fail)
        if action is None:
            return None
        return Decision(action, "spf", f"spf={outcome.result}")

    async def _check_greylist(self, request: PolicyRequest, ip: IPAddress) -> Decision | None:
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
            return None
        verdict = check_triplet(entry, now, self.greylist)
        await self.store.put(key, verdict.entry)
        if verdict.defer:
            wait = math.ceil(verdict.retry_in)
            return Decision(
                f"DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in {wait} seconds",
                "greylist", "new or too early triplet",
            )
        if verdict.delayed is None:
            return None
        if counts:
            await self.store.count_pass(network, now)
        transaction = self._transaction(request)
        if transaction.greylist_header_added:
            return None
        transaction.greylist_header_added = True
        header = greylist_header(verdict.delayed, self.settings.hostname, now)
        return Decision(f"PREPEND {header}", "greylist", "retried after the delay")

    async def _data_stage(self, request: PolicyRequest) -> Decision:
        """Add Received-SPF once the recipients are known and the message is coming."""
        ip = parse_ip(request.get("client_address", ""))
        trusted = self.settings.in_mynetworks(ip) or request.get("sasl_username")
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
