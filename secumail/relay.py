"""The content-filter relay shared by the ClamAV and SpamAssassin filters.

Postfix hands a message to the filter over SMTP; the filter inspects it and hands it to its
next hop. The relay works in lockstep with the next hop: MAIL and each RCPT are passed on
as they come and the next hop's answer goes back upstream unchanged (so a per-recipient
refusal stays per recipient), and the end of DATA is answered only once the next hop
answered it. Whatever goes wrong (next hop unreachable, timeout, scanner down, a bug) is a
451: Postfix keeps the message and retries. Nothing is lost, and refusals cascade up the
chain as the tutorial describes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from inspect import signature
from typing import Any, ClassVar, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax
from prometheus_client import Counter, Gauge, Histogram

from secumail import tracking
from secumail.access import AllowedClients
from secumail.connections import InFlight
from secumail.forwarded import HEADER as CLIENT_HEADER
from secumail.forwarded import ForwardedClient
from secumail.kept import KeptConnections
from secumail.logs import log_event
from secumail.lostacks import STILL_AWAITED, LostAcks, message_key
from secumail.message import header_block, header_block_end, normalize_newlines, split_headers
from secumail.netaddr import HostPort, Network, peer_name
from secumail.protocols.smtp import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    XFORWARD_NAMES,
    DotDecoder,
    NextHop,
    SmtpClient,
    SmtpReply,
    SmtpUnavailable,
    parameter_problem,
)
from secumail.quarantine import Quarantine, QuarantineFull
from secumail.settings import Settings

log = logging.getLogger("secumail.relay")

MESSAGES = Counter(
    "secumail_filter_messages", "Messages handled by a content filter", ["filter", "verdict"]
)
SCAN_SECONDS = Histogram(
    "secumail_filter_scan_duration_seconds", "Time the scanner took for one message",
    ["filter"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
BACKEND_ERRORS = Counter(
    "secumail_filter_backend_errors", "Scanner (clamd, spamd) failures", ["filter"]
)
NEXT_HOP_ERRORS = Counter(
    "secumail_filter_next_hop_errors", "Next hop unreachable or broken off", ["filter"]
)
RETRIED_ON_NEW_CONNECTION = Counter(
    "secumail_filter_retried_on_new_connection",
    "Transactions a kept next-hop connection answered 4xx (at MAIL or at the end of the "
    "message), then taken on another connection", ["filter"]
)
UNACKNOWLEDGED = Counter(
    "secumail_filter_unacknowledged",
    "Messages the next hop accepted when the client left before hearing so (RFC 1047): "
    "recorded, so that the client's retry is answered without being delivered again",
    ["filter"],
)
CONNECTIONS = Gauge("secumail_filter_connections", "Open SMTP connections", ["filter"])
QUARANTINE_FULL = Counter(
    "secumail_filter_quarantine_full",
    "Messages not quarantined for want of room (SECUMAIL_QUARANTINE_MAX_*): refused 452 "
    "before queue, dropped after queue",
    ["filter"],
)
BACKSCATTER_AVOIDED = Counter(
    "secumail_filter_backscatter_avoided",
    "Refusals turned into quarantine after queueing: a bounce would go to a forged sender",
    ["filter"],
)

TEMPFAIL_NEXT_HOP = "451 4.4.1 Next hop unavailable, please try again later"
TEMPFAIL_INTERNAL = "451 4.3.0 Internal error, please try again later"
# aiosmtpd refuses lines over 1001 bytes only once they end: a line that never ends would
# hold the connection until the idle timeout. Past this many bytes without one, hang up.
UNENDING_LINE = 65536
# The address Postfix sends, read without aiosmtpd's parser (see RelaySMTP._getaddr).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*")
# Next-hop connections are reused across Postfix's sessions (Postfix opens one per message):
# it spares a connection, a banner and an EHLO per message on both ends. Like Postfix's own
# connection cache: an idle connection is kept for a short while, and none is reused after
# a while, so that new replicas of a scaled next hop get their share.
REUSE_IDLE_SECONDS = 2.0
REUSE_TIME_LIMIT = 60.0
REUSE_MAX_IDLE = 64


@dataclass(frozen=True)
class Verdict:
    """What a filter decided about one message."""

    action: Literal["deliver", "reject", "drop", "quarantine", "tempfail"]
    label: str  # for metrics and logs: clean, virus, spam, ham, unchecked, error...
    reason: str = ""
    reply: str = ""  # the SMTP reply for reject and tempfail ("554 5.7.1 ...")
    headers: tuple[tuple[str, str], ...] = ()  # added on top when delivering
    remove: frozenset[str] = frozenset()  # headers of the same names, forged or stale
    message: bytes | None = None  # delivered instead of the one received (parts removed)


@dataclass(frozen=True)
class MessageInfo:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    client: dict[str, str]  # XFORWARD attributes from Postfix (ADDR, NAME, HELO, ...)


def refusal_after_queue(verdict: Verdict, client: ForwardedClient,
                        mynetworks: list[Network]) -> Verdict:
    """After queueing (after-queue mode), a filter's refusal makes our own Postfix bounce
    the message to its envelope sender, whom spammers and viruses forge: backscatter. So it
    is kept in quarantine instead, unless the client was trusted (mynetworks, or
    authenticated), whose own users deserve their bounce."""
    if verdict.action != "reject" or client.trusted(mynetworks):
        return verdict
    return replace(verdict, action="quarantine",
                   reason=f"{verdict.reason}; quarantined, not refused: a bounce would go to "
                   "a sender nobody vouches for")


Inspector = Callable[[MessageInfo, bytes], Awaitable[Verdict]]


@dataclass
class _Transaction:
    downstream: SmtpClient | None = None
    reused: bool = False  # the downstream served a transaction before: it may be closed now
    xforward: dict[str, str] = field(default_factory=dict)
    # MAIL and each RCPT the next hop accepted, with their options: the transaction again,
    # on a new connection, when a kept one refuses the message (_on_a_new_connection).
    mail: tuple[str, list[str]] | None = None
    recipients: list[tuple[str, list[str]]] = field(default_factory=list)
    # The message being handed to the next hop, while it is, and the one we last said 250
    # for until the client sends anything more: what is recorded (lost-acks) if the client
    # leaves meanwhile.
    relaying: bytes = b""
    answered: Answered | None = None


@dataclass(frozen=True)
class Answered:
    """A message and what the next hop said to it."""

    message: bytes
    sender: str
    recipients: tuple[str, ...]
    reply: str = ""

    @property
    def message_id(self) -> str:
        return tracking.message_id_of(self.message, header_block_end(self.message))

    @property
    def key(self) -> str:
        return message_key(self.message_id, self.sender, self.recipients, self.message)


class _HooksListedOnce:
    """aiosmtpd finds the server's commands and the handler's hooks with dir() and getattr()
    on both at every new connection: a sixth of a filter's time, with one connection per
    message. Those are names of the class, so dir() lists them once per class."""

    _names: ClassVar[dict[type, list[str]]] = {}

    def __dir__(self) -> list[str]:
        names = self._names.get(type(self))
        if names is None:
            prefixes = ("smtp_", "auth_", "handle_")
            names = [name for name in dir(type(self)) if name.startswith(prefixes)]
            self._names[type(self)] = names
        return names


class RelaySMTP(_HooksListedOnce, SMTP):
    """aiosmtpd's server plus XFORWARD, a connection cap, and the downstream's lifetime."""

    def __init__(self, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.relay = handler
        self.transaction = _Transaction()
        self._unterminated = 0  # bytes received since the last line end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.relay.connections >= self.relay.max_connections or self.relay.draining:
            log_event(log, "connection refused", logging.WARNING, filter=self.relay.name,
                      reason="draining" if self.relay.draining else "too many connections")
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.relay.connections += 1
        CONNECTIONS.labels(self.relay.name).inc()
        self._counted = True
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        """Before the greeting: only the hosts that hand this filter mail may use it (its
        next hop relays what it sends); anyone else gets a 554 greeting and is dropped."""
        assert self.session is not None and self.transport is not None
        peer = self.session.peer
        address = peer[0] if isinstance(peer, tuple) else ""
        try:
            allowed = await self.relay.clients.allows(address)
        except Exception as error:  # a bug here must not leave the client without an answer
            log.error("filter %s: checking client %s failed", self.relay.name, address,
                      exc_info=error)
            await self.push("421 4.3.0 Internal error, please try again later")
            self.transport.close()
            return
        if not allowed:
            log_event(log, "client refused", logging.WARNING, filter=self.relay.name,
                      peer=address or "?", allowed=str(self.relay.clients))
            await self.push(f"554 5.7.1 {self.hostname} Access denied: this {self.relay.name} "
                            "filter takes mail only from the hosts set to hand it mail")
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, with the parameters a relay must pass on (DSN's RET and ENVID
        as well as BODY, SMTPUTF8, SIZE), their values in their own case."""
        await self._envelope_command("MAIL", arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT, with DSN's NOTIFY and ORCPT, passed on."""
        await self._envelope_command("RCPT", arg)

    async def _envelope_command(self, verb: str, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed(verb):
            return
        assert self.envelope is not None and self.session is not None
        keyword = "FROM:" if verb == "MAIL" else "TO:"
        syntax = f"501 Syntax: {verb} {keyword} <address> [SP <parameters>]"
        if verb == "MAIL" and self.envelope.mail_from:
            await self.push("503 Error: nested MAIL command")
            return
        if verb == "RCPT" and not self.envelope.mail_from:
            await self.push("503 Error: need MAIL command")
            return
        stripped = self._strip_command_keyword(keyword, arg or "")
        if stripped is None:
            await self.push(syntax)
            return
        address, rest = self._getaddr(stripped)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if not address:
            await self.push(syntax)
            return
        parameters = (rest or "").split()
        known = MAIL_PARAMETERS if verb == "MAIL" else RCPT_PARAMETERS
        problem = parameter_problem(parameters, known, self.data_size_limit)
        if problem is not None:
            await self.push(problem)
            return
        status = await self._call_handler_hook(verb, address, parameters)
        await self.push(status)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the message read in chunks (DotDecoder), not line by line:
        aiosmtpd kept an object per line (400 MB for 10 MB of empty lines) and refused
        lines over 1,000 bytes that Postfix passes on. Commands pipelined after the final
        dot go back to the reader."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        decoder = DotDecoder(self.data_size_limit)
        while not decoder.done:
            chunk = await self._reader.read(65536)
            if not chunk:
                return  # the client left mid-message: nothing to answer
            decoder.feed(chunk)
        if decoder.rest:
            self._reader._buffer[:0] = decoder.rest  # type: ignore[attr-defined]
        if decoder.too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("552 5.3.4 Message too big for this system")
            return
        self.envelope.content = self.envelope.original_content = decoder.message()
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        end = data.rfind(b"\n")
        self._unterminated = len(data) - end - 1 if end >= 0 else self._unterminated + len(data)
        if self._unterminated > UNENDING_LINE:
            log_event(log, "connection dropped", logging.WARNING, filter=self.relay.name,
                      peer=peer_name(self.session.peer if self.session else None),
                      reason=f"no line end in {UNENDING_LINE} bytes")
            self.transport.write(b"500 5.5.2 Line too long, closing connection\r\n")  # type: ignore[attr-defined]
            self.transport.close()
            return
        self.transaction.answered = None  # the client is still there after our reply
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.relay.connections -= 1
            CONNECTIONS.labels(self.relay.name).dec()
            downstream = self.transaction.downstream
            if downstream is not None:
                self.transaction.downstream = None
                if downstream.delivered_unanswered and self.envelope is not None:
                    # Our client left while the next hop's answer to the final dot was on
                    # its way: too late to take the message back, so read what it says.
                    self.relay.settle(downstream, Answered(
                        self.transaction.relaying, str(self.envelope.mail_from),
                        tuple(self.envelope.rcpt_tos)))
                else:
                    self.relay.release(downstream)
            if isinstance(error, ConnectionResetError) and self.transaction.answered is not None:
                # A reset, not an end: the client's socket closed with data unread, and all
                # we had sent since its last command was our 250 (a client killed just then).
                self.relay.lost_ack(self.transaction.answered, "client reset the connection "
                                    "without reading our 250")
            super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd parses MAIL and RCPT addresses with `email`'s header parser, a tenth of
        a filter's time; the plain `<local@domain>` Postfix sends is read here directly."""
        plain = PLAIN_ADDRESS.match(arg)
        if plain is None or (self.local_part_limit
                             and len(plain[1].rpartition("@")[0]) > self.local_part_limit):
            return SMTP._getaddr(self, arg)
        return plain[1], arg[plain.end():]

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's client attributes (XFORWARD_README), passed on to the next hop."""
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value ...")
            return
        attributes = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in XFORWARD_NAMES or len(value) > 255:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute {name[:32]!r}")
                return
            attributes[name.upper()] = value
        self.transaction.xforward.update(attributes)
        await self.push("250 2.0.0 Ok")


def verdict_event(name: str, info: MessageInfo, message: bytes, verdict: Verdict, reply: str,
                  received: float | None = None) -> tracking.Event:
    """The tracking event of one message through a filter: the verdict, and where the
    message went (the next hop's queue id when it took it, "queued as ...")."""
    final = reply.split("\r\n")[-1]
    if verdict.action in ("quarantine", "drop") and final.startswith("2"):
        outcome = "quarantined" if verdict.action == "quarantine" else "dropped"
    else:
        outcome = {"2": "passed", "4": "deferred"}.get(final[:1], "refused")
    detail = f"{verdict.label}: {verdict.reason}" if verdict.reason else verdict.label
    return tracking.event(
        name, outcome, f"{detail}; {final[:200]}", client=info.client.get("ADDR", ""),
        sender=info.mail_from, recipients=info.rcpt_tos, queue_id=info.client.get("IDENT", ""),
        next_queue_id=tracking.queued_as(final),
        message_id=tracking.message_id_of(message, header_block_end(message)), at=received)


class RelayHandler(_HooksListedOnce):
    """aiosmtpd handler: lockstep relay to `next_hop`, with `inspect` deciding at DATA."""

    def __init__(
        self, name: str, next_hop: HostPort, inspect: Inspector, hostname: str,
        timeout: float, quarantine: Quarantine, max_connections: int,
        clients: AllowedClients | None = None, before_queue: bool = False,
        mynetworks: list[Network] | None = None,
    ) -> None:
        self.name = name
        # Before-queue: the client waits for our answer, so a refusal is a 5xx it sees, and
        # the real client goes on in X-SecuMail-Client for the milter behind us. After-queue:
        # see refusal_after_queue.
        self.before_queue = before_queue
        self.mynetworks = mynetworks or []
        self.clients = clients or AllowedClients([])
        self.next_hop = NextHop(next_hop)
        self.inspect = inspect
        self.hostname = hostname
        self.timeout = timeout
        self.quarantine = quarantine
        # Shared with every replica of both filters (the quarantine volume).
        self.lost_acks = LostAcks(quarantine.directory / "lost-acks")
        self.max_connections = max_connections
        self.connections = 0
        self.draining = False
        self.inflight = InFlight()
        self.closing: set[asyncio.Future[None]] = set()  # next-hop QUITs under way
        self.kept = KeptConnections[SmtpClient](REUSE_IDLE_SECONDS, REUSE_MAX_IDLE, self._quit)

    # --- the transaction, command by command ---------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands line by line, so a client may send them in groups
        # (RFC 2920): Postfix then sends MAIL, RCPT and DATA in one packet.
        ours = ["250-PIPELINING", "250-DSN", "250-XFORWARD " + " ".join(XFORWARD_NAMES)]
        return [*responses[:-1], *ours, responses[-1]]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        transaction = server.transaction
        # aiosmtpd hands the null sender of bounces over as "<>"; it must stay <>.
        sender = "" if address == "<>" else address
        try:
            while True:
                downstream = await self._downstream(transaction)
                if isinstance(downstream, str):
                    return downstream
                try:
                    reply = await downstream.mail(sender, options, transaction.xforward)
                except SmtpUnavailable:
                    if not transaction.reused:
                        raise
                    continue  # a kept connection the next hop had closed: open a new one
                if reply.code // 100 == 4 and transaction.reused:
                    # A kept session that refuses a new transaction may hold what died since
                    # it opened (10027's smtpd keeps its milter connection: a restarted
                    # milter leaves it answering 451 at MAIL). It is never kept again, and
                    # one new connection, not another kept one, answers; its 4xx stands.
                    self._quit(downstream)
                    transaction.downstream = None
                    RETRIED_ON_NEW_CONNECTION.labels(self.name).inc()
                    log_event(log, "kept next-hop connection refused MAIL: taking a new one",
                              logging.WARNING, filter=self.name, refused=str(reply)[:120])
                    fresh = await self._new_downstream(transaction)
                    if isinstance(fresh, str):
                        return fresh
                    reply = await fresh.mail(sender, options, transaction.xforward)
                break
        except SmtpUnavailable as error:
            return self._next_hop_failed(error)
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            transaction.mail, transaction.recipients = (sender, list(options)), []
        return str(reply)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        downstream = server.transaction.downstream
        if downstream is None or not downstream.connected:
            return TEMPFAIL_NEXT_HOP
        try:
            reply = await downstream.rcpt(address, options)
        except SmtpUnavailable as error:
            return self._next_hop_failed(error)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            server.transaction.recipients.append((address, list(options)))
        return str(reply)

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        transaction = server.transaction
        received = time.time()
        with self.inflight.track():
            info = MessageInfo(
                str(envelope.mail_from), tuple(envelope.rcpt_tos), dict(transaction.xforward)
            )
            transaction.xforward.clear()
            content = envelope.original_content
            message = normalize_newlines(content if isinstance(content, bytes) else b"")
            started = time.perf_counter()
            try:
                verdict = self._delivered_before(info, message) or \
                    await self.inspect(info, message)
            except Exception:
                # A bug in a scanner's glue: keep the mail in Postfix's queue, and cancel the
                # next hop's open transaction like any other non-delivery (via _act).
                log.exception("filter %s: inspection failed", self.name)
                verdict = Verdict("tempfail", "error", "internal error", reply=TEMPFAIL_INTERNAL)
            SCAN_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            client = ForwardedClient.from_xforward(info.client)
            if not self.before_queue:
                refused = verdict
                verdict = refusal_after_queue(verdict, client, self.mynetworks)
                if verdict is not refused:
                    BACKSCATTER_AVOIDED.labels(self.name).inc()
            transaction.relaying = message  # kept if the client leaves meanwhile
            reply = await self._act(transaction, info, message, verdict, client)
            transaction.relaying = b""
            transaction.answered = Answered(message, info.mail_from, info.rcpt_tos, reply) \
                if reply.startswith("250") else None
            MESSAGES.labels(self.name, verdict.label).inc()
            log_event(
                log, "message", filter=self.name, verdict=verdict.label, action=verdict.action,
                reason=verdict.reason, reply=reply.split("\r\n")[-1][:120],
                client=info.client.get("ADDR", ""), sender=info.mail_from,
                recipients=",".join(info.rcpt_tos), size=len(message),
            )
            if tracking.EVENTS.enabled:
                tracking.record(verdict_event(self.name, info, message, verdict, reply,
                                              received))
            return reply

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server.transaction.xforward.clear()
        server.transaction.mail, server.transaction.recipients = None, []
        downstream = server.transaction.downstream
        if downstream is not None and downstream.connected:
            try:
                await downstream.command("RSET")
            except SmtpUnavailable:
                pass  # the next MAIL will reconnect
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """A bug must not bounce mail: aiosmtpd would say 500; say 451 so Postfix retries."""
        log.error("filter %s: internal error", self.name, exc_info=error)
        return TEMPFAIL_INTERNAL

    # --- helpers -------------------------------------------------------------------------

    def _delivered_before(self, info: MessageInfo, message: bytes) -> Verdict | None:
        """The retry of a message delivered once already whose 250 its client never heard
        (secumail/lostacks.py): answered 250, not passed on again."""
        try:
            if not self.lost_acks.pending():
                return None
            answered = Answered(message, info.mail_from, info.rcpt_tos)
            if not answered.message_id:  # two such messages may well be two (see lost_ack)
                return None
            earlier = self.lost_acks.take(answered.key)
        except OSError as error:  # never a reason to refuse mail: scan and pass it on
            log_event(log, "lost-acks unreadable", logging.ERROR, filter=self.name,
                      error=str(error))
            return None
        if earlier is None:
            return None
        if earlier == STILL_AWAITED:
            return Verdict("tempfail", "duplicate", "an earlier copy's answer is awaited",
                           reply="451 4.3.0 An earlier copy of this message is still being "
                           "delivered, please try again later")
        return Verdict("drop", "duplicate", f"delivered before ({earlier[:100]}); the client "
                       "had not heard so")

    async def _downstream(self, transaction: _Transaction) -> SmtpClient | str:
        """The next-hop connection of this session: its own, a kept one, or a new one."""
        client = transaction.downstream
        if client is not None and client.connected:
            transaction.reused = True  # it served this session's previous transaction
            return client
        client = self.kept.take(
            lambda kept: kept.connected and time.monotonic() - kept.opened < REUSE_TIME_LIMIT
        )
        transaction.reused = client is not None
        if client is not None:
            transaction.downstream = client
            return client
        return await self._new_downstream(transaction)

    async def _new_downstream(self, transaction: _Transaction) -> SmtpClient | str:
        """A new next-hop connection for this session, or the reply to give the client."""
        transaction.reused = False
        connected = await self._connect()
        if isinstance(connected, SmtpReply):
            log_event(log, "next hop refused the session", logging.WARNING, filter=self.name,
                      reply=str(connected)[:200])
            # A 5xx greeting must not bounce mail that a healthy replica would take.
            return TEMPFAIL_NEXT_HOP if connected.code >= 500 else str(connected)
        transaction.downstream = connected
        return connected

    async def _connect(self) -> SmtpClient | SmtpReply:
        """A new next-hop connection past its greeting and EHLO, or the reply that refused
        it (the connection closed)."""
        client = SmtpClient(self.timeout)
        reply = await client.connect(self.next_hop, self.hostname)
        if reply.code != 250:
            await client.close()
            return reply
        return client

    async def _on_a_new_connection(
        self, transaction: _Transaction, xforward: dict[str, str],
        pieces: list[bytes | memoryview], refused: SmtpReply,
    ) -> SmtpReply | None:
        """A kept connection answered a whole message 4xx: its session at the next hop may
        hold something that died since it opened (Postfix's 10027 smtpd keeps its milter
        connection; a restarted milter leaves it answering 451 until it ends). The same
        transaction once more, on a connection of its own: all of MAIL and RCPT taken, or
        the first answer stands (None). A 4xx means the message was not taken: no copy."""
        if transaction.mail is None or self.draining:
            return None
        sender, options = transaction.mail
        try:
            fresh = await self._connect()
        except SmtpUnavailable:
            return None
        if isinstance(fresh, SmtpReply):
            return None
        try:
            taken = (await fresh.mail(sender, options, xforward)).ok
            for address, rcpt_options in transaction.recipients if taken else []:
                taken = taken and (await fresh.rcpt(address, rcpt_options)).ok
            if not taken:
                await fresh.quit()
                return None
            reply = await fresh.data(pieces)
        except SmtpUnavailable:
            await fresh.close()
            return None
        old, transaction.downstream, transaction.reused = transaction.downstream, fresh, False
        if old is not None:
            self._quit(old)  # its session is suspect: never kept again
        RETRIED_ON_NEW_CONNECTION.labels(self.name).inc()
        log_event(log, "kept next-hop connection refused a message: a new one answered",
                  logging.WARNING, filter=self.name, refused=str(refused)[:120],
                  reply=str(reply)[:120])
        return reply

    def settle(self, client: SmtpClient, message: Answered) -> None:
        """The next hop's late answer to a message whose client left: a 250 means delivered
        with nobody told, whose retry must not be delivered again. Until it comes, a retry
        is answered 451 (the client may retry at once, before the answer: it would be
        delivered beside the first copy)."""
        awaited = bool(message.message_id)  # see lost_ack: no record without one
        if awaited:
            try:
                self.lost_acks.await_answer(message.key)
            except OSError as error:
                log_event(log, "lost-acks unwritable", logging.ERROR, filter=self.name,
                          error=str(error))
                awaited = False

        async def read() -> None:
            reply = await client.late_reply()
            if reply is not None and reply.ok:
                self.lost_ack(replace(message, reply=str(reply)),
                              "client left while the next hop's 250 was on its way")
                return
            if awaited:
                try:
                    self.lost_acks.forget(message.key)
                except OSError:
                    pass  # expires after AWAITED_TTL
            log_event(log, "client left before the next hop answered", logging.WARNING,
                      filter=self.name, message_id=message.message_id,
                      reply=str(reply)[:120] if reply else "none: it may have the message")
        self.closing.add(asyncio.ensure_future(read()))
        self.closing = {task for task in self.closing if not task.done()}

    def lost_ack(self, message: Answered, what: str) -> None:
        UNACKNOWLEDGED.labels(self.name).inc()
        if not message.message_id:
            # Without a Message-ID, the same envelope and body a day apart may be two
            # messages (a daily cron report): the retry is delivered again, never discarded.
            log_event(log, f"{what}: no Message-ID, its retry will be delivered again",
                      logging.WARNING, filter=self.name, reply=message.reply[:120])
            return
        try:
            self.lost_acks.record(message.key, message.reply)
        except OSError as error:
            log_event(log, f"{what}: its retry will be a duplicate (not recorded: {error})",
                      logging.ERROR, filter=self.name, message_id=message.message_id)
            return
        log_event(log, f"{what}: its retry will be answered 250 and not delivered again",
                  logging.WARNING, filter=self.name, message_id=message.message_id,
                  reply=message.reply[:120])

    def release(self, client: SmtpClient) -> None:
        """Keep a next-hop connection whose transaction is over for the next session."""
        if client.reusable and not self.draining:
            self.kept.keep(client)
        else:
            self._quit(client)

    def _quit(self, client: SmtpClient) -> None:
        self.closing.add(asyncio.ensure_future(client.quit()))
        self.closing = {task for task in self.closing if not task.done()}

    def _next_hop_failed(self, error: Exception) -> str:
        NEXT_HOP_ERRORS.labels(self.name).inc()
        log_event(log, "next hop unavailable", logging.WARNING, filter=self.name, error=str(error))
        return TEMPFAIL_NEXT_HOP

    async def _act(
        self, transaction: _Transaction, info: MessageInfo, message: bytes, verdict: Verdict,
        client: ForwardedClient,
    ) -> str:
        downstream = transaction.downstream
        if verdict.action == "deliver":
            if verdict.message is not None:
                message = verdict.message
            if downstream is None or not downstream.connected:
                return self._next_hop_failed(SmtpUnavailable("connection lost before DATA"))
            headers = list(verdict.headers)
            if self.before_queue:
                headers.append((CLIENT_HEADER, client.header_value()))
            # Three pieces around the one copy of the message: no whole copy is made. The
            # client header is always removed: only ours may reach the milter.
            kept, body = split_headers(message, {*verdict.remove, CLIENT_HEADER})
            pieces: list[bytes | memoryview] = [
                header_block(headers), kept, memoryview(message)[body:]]
            try:
                reply = await downstream.data(pieces)
            except SmtpUnavailable as error:
                return self._next_hop_failed(error)
            if reply.code // 100 == 4 and transaction.reused:
                again = await self._on_a_new_connection(transaction, info.client, pieces, reply)
                if again is not None:
                    return str(again)
            return str(reply)
        # Not delivering: the next hop holds an open transaction for this message; cancel it.
        if downstream is not None and downstream.connected:
            try:
                await downstream.command("RSET")
            except SmtpUnavailable:
                pass
        if verdict.action == "quarantine":
            try:
                ident = await asyncio.to_thread(
                    self.quarantine.store, self.name, info, message, verdict.label, verdict.reason
                )
            except QuarantineFull as full:
                QUARANTINE_FULL.labels(self.name).inc()
                log_event(log, "quarantine full", logging.WARNING, filter=self.name,
                          held=str(full), verdict=verdict.label)
                if self.before_queue:  # the client keeps it and retries
                    return "452 4.3.1 Quarantine full, please try again later"
                # After queue a 4xx would hold it in Postfix's queue for days, and a
                # bounce would go to a sender nobody vouches for: dropped, counted.
                return f"250 2.0.0 Ok: discarded, quarantine full ({verdict.reason})"
            except OSError as error:
                log_event(log, "quarantine failed", logging.ERROR, error=str(error))
                return "451 4.3.0 Quarantine unavailable, please try again later"
            return f"250 2.0.0 Ok: quarantined as {ident} ({verdict.reason})"
        if verdict.action == "drop":
            return f"250 2.0.0 Ok: discarded ({verdict.reason})"
        return verdict.reply  # reject or tempfail


# aiosmtpd reads handle_EHLO's signature at every connection (to tell its old 4-argument form
# from the 5-argument one), a third of a new connection's cost; inspect.signature() returns a
# function's __signature__ as it is, so it is worked out once, here.
RelayHandler.handle_EHLO.__signature__ = signature(RelayHandler.handle_EHLO)  # type: ignore[attr-defined]


class FilterService:
    """A content filter: an SMTP listener whose messages go through `inspect`."""

    def __init__(self, name: str, listen: HostPort, handler: RelayHandler,
                 message_size_limit: int, hostname: str, idle_timeout: float = 300.0) -> None:
        self.name = name
        self.listen = listen
        self.handler = handler
        self.message_size_limit = message_size_limit
        self.hostname = hostname
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler, data_size_limit=self.message_size_limit, enable_SMTPUTF8=True,
            decode_data=False, hostname=self.hostname, ident=f"SecuMail {self.name} filter",
            timeout=self.idle_timeout, loop=asyncio.get_running_loop(),
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.listen.host, self.listen.port, reuse_address=True
        )
        log_event(log, "listening", filter=self.name, listen=str(self.listen),
                  next_hop=str(self.handler.next_hop.address))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let messages being scanned or relayed finish, then close."""
        self.handler.draining = True
        self.handler.kept.close_all()
        if self._server is not None:
            self._server.close()
        if not await self.handler.inflight.wait_idle(timeout):
            log_event(log, "drain timed out", logging.WARNING, filter=self.name)


def filter_service(
    name: str, listen: HostPort, next_hop: HostPort, allowed_clients: list[str],
    inspect: Inspector, settings: Settings,
) -> FilterService:
    """A content filter from the shared settings: only its name, ports, clients and
    inspector differ."""
    handler = RelayHandler(
        name, next_hop, inspect, settings.hostname, settings.relay_timeout,
        Quarantine(settings.quarantine_dir, settings.quarantine_limits),
        settings.filter_max_connections,
        AllowedClients(allowed_clients), settings.filter_mode == "before-queue",
        settings.trusted_networks,
    )
    return FilterService(name, listen, handler, settings.message_size_limit, settings.hostname,
                         settings.filter_idle_timeout)
