"""A content filter's sessions: one per client connection, one envelope per MAIL, relayed in
lockstep to the next hop.

MAIL and each RCPT are passed on as they come and the next hop's answer goes back upstream
unchanged (a per-recipient refusal stays per recipient); the end of DATA is answered only
once the next hop answered it. Whatever goes wrong (next hop unreachable, timeout, scanner
down, a bug) is a 451: Postfix keeps the message and retries. Nothing is lost.

`Filter` is what every session of one filter shares (the next hop and its kept connections,
the lost-acks record, the quarantine, the connection count); `FilterSession` is one client's.
Neither knows SMTP's syntax: secumail/filter/aiosmtpd_adapter.py reads the commands and calls
the session with addresses, options and the message; what is decided about a message is in
secumail/filter/verdicts.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from secumail import tracking
from secumail.access import AllowedClients
from secumail.connections import InFlight
from secumail.filter import metrics
from secumail.filter.verdicts import (
    INTERNAL_ERROR,
    TEMPFAIL_NEXT_HOP,
    Inspector,
    Verdict,
    quarantine_full_reply,
    refusal_after_queue,
    retry_verdict,
    verdict_event,
)
from secumail.forwarded import HEADER as CLIENT_HEADER
from secumail.forwarded import ForwardedClient
from secumail.kept import KeptConnections
from secumail.limits import NEXT_HOP_IDLE, NEXT_HOP_KEPT, NEXT_HOP_REUSE_LIMIT
from secumail.logs import log_event
from secumail.lostacks import LostAcks, message_key
from secumail.message import header_block, header_block_end, normalize_newlines, split_headers
from secumail.netaddr import HostPort, Network
from secumail.protocols.smtp import Envelope, NextHop, SmtpClient, SmtpReply, SmtpUnavailable
from secumail.quarantine import Quarantine, QuarantineFull

log = logging.getLogger("secumail.filter")

@dataclass(frozen=True)
class Relayed:
    """A message handed to the next hop, and what it said (once it did)."""

    envelope: Envelope
    message: bytes
    reply: str = ""

    @property
    def message_id(self) -> str:
        return tracking.message_id_of(self.message, header_block_end(self.message))

    @property
    def key(self) -> str:
        return message_key(self.message_id, self.envelope.mail_from, self.envelope.rcpt_tos,
                           self.message)


class Filter:
    """One content filter: what all its sessions share."""

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
        self.closing: set[asyncio.Future[None]] = set()  # next-hop QUITs, late replies
        self.kept = KeptConnections[SmtpClient](NEXT_HOP_IDLE, NEXT_HOP_KEPT, self.quit)

    # --- connections -----------------------------------------------------------------------

    def open_session(self) -> FilterSession | None:
        """A new client's session; None (logged) when draining or at the connection cap."""
        if self.connections >= self.max_connections or self.draining:
            log_event(log, "connection refused", logging.WARNING, filter=self.name,
                      reason="draining" if self.draining else "too many connections")
            return None
        self.connections += 1
        metrics.CONNECTIONS.labels(self.name).inc()
        return FilterSession(self)

    async def refusal(self, address: str) -> str | None:
        """Before the greeting: only the hosts that hand this filter mail may use it (its
        next hop relays what it sends); anyone else is refused (the reply to give)."""
        try:
            allowed = await self.clients.allows(address)
        except Exception as error:  # a bug here must not leave the client without an answer
            log.error("filter %s: checking client %s failed", self.name, address,
                      exc_info=error)
            return "421 4.3.0 Internal error, please try again later"
        if allowed:
            return None
        log_event(log, "client refused", logging.WARNING, filter=self.name,
                  peer=address or "?", allowed=str(self.clients))
        return (f"554 5.7.1 {self.hostname} Access denied: this {self.name} filter takes "
                "mail only from the hosts set to hand it mail")

    def background(self, work: asyncio.Future[None]) -> None:
        self.closing.add(work)
        self.closing = {task for task in self.closing if not task.done()}

    def quit(self, client: SmtpClient) -> None:
        self.background(asyncio.ensure_future(client.quit()))

    def release(self, client: SmtpClient) -> None:
        """Keep a next-hop connection whose transaction is over for the next session."""
        if client.reusable and not self.draining:
            self.kept.keep(client)
        else:
            self.quit(client)

    async def connect(self) -> SmtpClient | SmtpReply:
        """A new next-hop connection past its greeting and EHLO, or the reply that refused
        it (the connection closed)."""
        client = SmtpClient(self.timeout)
        reply = await client.connect(self.next_hop, self.hostname)
        if reply.code != 250:
            await client.close()
            return reply
        return client

    def next_hop_failed(self, error: Exception) -> str:
        metrics.NEXT_HOP_ERRORS.labels(self.name).inc()
        log_event(log, "next hop unavailable", logging.WARNING, filter=self.name,
                  error=str(error))
        return TEMPFAIL_NEXT_HOP

    # --- messages whose client never heard the next hop's 250 (secumail/lostacks.py) -------

    def known_retry(self, relayed: Relayed) -> Verdict | None:
        """The verdict on a message delivered once already whose 250 its client never heard;
        None for any other message."""
        try:
            if not self.lost_acks.pending():
                return None
            if not relayed.message_id:  # two such messages may well be two (see lost_ack)
                return None
            return retry_verdict(self.lost_acks.take(relayed.key))
        except OSError as error:  # never a reason to refuse mail: scan and pass it on
            log_event(log, "lost-acks unreadable", logging.ERROR, filter=self.name,
                      error=str(error))
            return None

    def settle(self, client: SmtpClient, relayed: Relayed) -> None:
        """The next hop's late answer to a message whose client left: a 250 means delivered
        with nobody told, whose retry must not be delivered again. Until it comes, a retry
        is answered 451 (the client may retry at once, before the answer: it would be
        delivered beside the first copy)."""
        awaited = bool(relayed.message_id)  # see lost_ack: no record without one
        if awaited:
            try:
                self.lost_acks.await_answer(relayed.key)
            except OSError as error:
                log_event(log, "lost-acks unwritable", logging.ERROR, filter=self.name,
                          error=str(error))
                awaited = False

        async def read() -> None:
            reply = await client.late_reply()
            if reply is not None and reply.ok:
                self.lost_ack(replace(relayed, reply=str(reply)),
                              "client left while the next hop's 250 was on its way")
                return
            if awaited:
                try:
                    self.lost_acks.forget(relayed.key)
                except OSError:
                    pass  # expires after AWAITED_TTL
            log_event(log, "client left before the next hop answered", logging.WARNING,
                      filter=self.name, message_id=relayed.message_id,
                      reply=str(reply)[:120] if reply else "none: it may have the message")
        self.background(asyncio.ensure_future(read()))

    def lost_ack(self, relayed: Relayed, what: str) -> None:
        metrics.UNACKNOWLEDGED.labels(self.name).inc()
        if not relayed.message_id:
            # Without a Message-ID, the same envelope and body a day apart may be two
            # messages (a daily cron report): the retry is delivered again, never discarded.
            log_event(log, f"{what}: no Message-ID, its retry will be delivered again",
                      logging.WARNING, filter=self.name, reply=relayed.reply[:120])
            return
        try:
            self.lost_acks.record(relayed.key, relayed.reply)
        except OSError as error:
            log_event(log, f"{what}: its retry will be a duplicate (not recorded: {error})",
                      logging.ERROR, filter=self.name, message_id=relayed.message_id)
            return
        log_event(log, f"{what}: its retry will be answered 250 and not delivered again",
                  logging.WARNING, filter=self.name, message_id=relayed.message_id,
                  reply=relayed.reply[:120])


class FilterSession:
    """One client connection: the XFORWARD attributes it sent, the envelope of its current
    transaction, and the next-hop connection that transaction is relayed on."""

    def __init__(self, filter: Filter) -> None:
        self.filter = filter
        self.client: dict[str, str] = {}  # XFORWARD attributes, for the coming transaction
        self.envelope: Envelope | None = None  # MAIL and each RCPT the next hop took
        self.downstream: SmtpClient | None = None
        self.reused = False  # the downstream served a transaction before: it may be closed
        # The message being handed to the next hop, while it is, and the one we last said
        # 250 for until the client sends anything more: what is recorded (lost-acks) if the
        # client leaves meanwhile.
        self.relaying: Relayed | None = None
        self.answered: Relayed | None = None

    # --- the transaction, command by command -----------------------------------------------

    def xforward(self, attributes: dict[str, str]) -> None:
        self.client.update(attributes)

    async def mail(self, sender: str, options: list[str]) -> str:
        """MAIL FROM:<sender> ("" for the null sender), passed on; the next hop's reply."""
        filter = self.filter
        try:
            while True:
                downstream = await self._downstream()
                if isinstance(downstream, str):
                    return downstream
                try:
                    reply = await downstream.mail(sender, options, self.client)
                except SmtpUnavailable:
                    if not self.reused:
                        raise
                    continue  # a kept connection the next hop had closed: open a new one
                if reply.code // 100 == 4 and self.reused:
                    # A kept session that refuses a new transaction may hold what died since
                    # it opened (10027's smtpd keeps its milter connection: a restarted
                    # milter leaves it answering 451 at MAIL). It is never kept again, and
                    # one new connection, not another kept one, answers; its 4xx stands.
                    filter.quit(downstream)
                    self.downstream = None
                    metrics.RETRIED_ON_NEW_CONNECTION.labels(filter.name).inc()
                    log_event(log, "kept next-hop connection refused MAIL: taking a new one",
                              logging.WARNING, filter=filter.name, refused=str(reply)[:120])
                    fresh = await self._new_downstream()
                    if isinstance(fresh, str):
                        return fresh
                    reply = await fresh.mail(sender, options, self.client)
                break
        except SmtpUnavailable as error:
            return filter.next_hop_failed(error)
        if reply.ok:
            self.envelope = Envelope(sender, (), dict(self.client), tuple(options))
        return str(reply)

    async def rcpt(self, recipient: str, options: list[str]) -> str:
        downstream = self.downstream
        if self.envelope is None or downstream is None or not downstream.connected:
            return TEMPFAIL_NEXT_HOP
        try:
            reply = await downstream.rcpt(recipient, options)
        except SmtpUnavailable as error:
            return self.filter.next_hop_failed(error)
        if reply.ok:
            self.envelope = self.envelope.with_recipient(recipient, options)
        return str(reply)

    async def data(self, message: bytes) -> str:
        """The message (CRLF or LF line ends, dots unstuffed): inspected, acted on, the reply
        to give. The transaction is over after it, whatever the reply."""
        filter = self.filter
        envelope, self.envelope = self.envelope, None
        self.client = {}
        assert envelope is not None, "the adapter sends DATA only after a recipient"
        received = time.time()
        with filter.inflight.track():
            relayed = Relayed(envelope, normalize_newlines(message))
            started = time.perf_counter()
            try:
                verdict = filter.known_retry(relayed) or \
                    await filter.inspect(envelope, relayed.message)
            except Exception:
                # A bug in a scanner's glue: keep the mail in Postfix's queue, and cancel the
                # next hop's open transaction like any other non-delivery (via _act).
                log.exception("filter %s: inspection failed", filter.name)
                verdict = INTERNAL_ERROR
            metrics.SCAN_SECONDS.labels(filter.name).observe(time.perf_counter() - started)
            client = ForwardedClient.from_xforward(envelope.client)
            if not filter.before_queue:
                refused = verdict
                verdict = refusal_after_queue(verdict, client, filter.mynetworks)
                if verdict is not refused:
                    metrics.BACKSCATTER_AVOIDED.labels(filter.name).inc()
            self.relaying = relayed  # kept if the client leaves meanwhile
            reply = await self._act(relayed, verdict, client)
            self.relaying = None
            self.answered = replace(relayed, reply=reply) if reply.startswith("250") else None
            metrics.MESSAGES.labels(filter.name, verdict.label).inc()
            log_event(
                log, "message", filter=filter.name, verdict=verdict.label,
                action=verdict.action, reason=verdict.reason,
                reply=reply.split("\r\n")[-1][:120], client=envelope.client.get("ADDR", ""),
                sender=envelope.mail_from, recipients=",".join(envelope.rcpt_tos),
                size=len(relayed.message),
            )
            if tracking.EVENTS.enabled:
                tracking.record(verdict_event(filter.name, envelope, relayed.message, verdict,
                                              reply, received))
            return reply

    async def rset(self) -> None:
        self.client, self.envelope = {}, None
        await self._cancel_downstream_transaction()

    def client_spoke(self) -> None:
        """The client sent something after our last reply: it heard it."""
        self.answered = None

    def closed(self, reset: bool) -> None:
        """The client's connection is gone (`reset`: with data of ours unread)."""
        filter = self.filter
        filter.connections -= 1
        metrics.CONNECTIONS.labels(filter.name).dec()
        downstream, self.downstream = self.downstream, None
        if downstream is not None:
            if downstream.delivered_unanswered and self.relaying is not None:
                # Our client left while the next hop's answer to the final dot was on its
                # way: too late to take the message back, so read what it says.
                filter.settle(downstream, self.relaying)
            else:
                filter.release(downstream)
        if reset and self.answered is not None:
            # A reset, not an end: the client's socket closed with data unread, and all we
            # had sent since its last command was our 250 (a client killed just then).
            filter.lost_ack(self.answered, "client reset the connection without reading "
                            "our 250")

    # --- the next hop ----------------------------------------------------------------------

    async def _downstream(self) -> SmtpClient | str:
        """The next-hop connection of this session: its own, a kept one, or a new one."""
        client = self.downstream
        if client is not None and client.connected:
            self.reused = True  # it served this session's previous transaction
            return client
        client = self.filter.kept.take(
            lambda kept: kept.connected and time.monotonic() - kept.opened < NEXT_HOP_REUSE_LIMIT
        )
        self.reused = client is not None
        if client is not None:
            self.downstream = client
            return client
        return await self._new_downstream()

    async def _new_downstream(self) -> SmtpClient | str:
        """A new next-hop connection for this session, or the reply to give the client."""
        self.reused = False
        connected = await self.filter.connect()
        if isinstance(connected, SmtpReply):
            log_event(log, "next hop refused the session", logging.WARNING,
                      filter=self.filter.name, reply=str(connected)[:200])
            # A 5xx greeting must not bounce mail that a healthy replica would take.
            return TEMPFAIL_NEXT_HOP if connected.code >= 500 else str(connected)
        self.downstream = connected
        return connected

    async def _cancel_downstream_transaction(self) -> None:
        downstream = self.downstream
        if downstream is not None and downstream.connected:
            try:
                await downstream.command("RSET")
            except SmtpUnavailable:
                pass  # the next MAIL will reconnect

    async def _on_a_new_connection(self, relayed: Relayed, pieces: list[bytes | memoryview],
                                   refused: SmtpReply) -> SmtpReply | None:
        """A kept connection answered a whole message 4xx: its session at the next hop may
        hold something that died since it opened (Postfix's 10027 smtpd keeps its milter
        connection; a restarted milter leaves it answering 451 until it ends). The same
        transaction once more, on a connection of its own: all of MAIL and RCPT taken, or
        the first answer stands (None). A 4xx means the message was not taken: no copy."""
        filter, envelope = self.filter, relayed.envelope
        if filter.draining:
            return None
        try:
            fresh = await filter.connect()
        except SmtpUnavailable:
            return None
        if isinstance(fresh, SmtpReply):
            return None
        try:
            taken = (await fresh.mail(envelope.mail_from, envelope.mail_options,
                                      envelope.client)).ok
            for recipient, options in envelope.recipients() if taken else ():
                taken = taken and (await fresh.rcpt(recipient, options)).ok
            if not taken:
                await fresh.quit()
                return None
            reply = await fresh.data(pieces)
        except SmtpUnavailable:
            await fresh.close()
            return None
        old, self.downstream, self.reused = self.downstream, fresh, False
        if old is not None:
            filter.quit(old)  # its session is suspect: never kept again
        metrics.RETRIED_ON_NEW_CONNECTION.labels(filter.name).inc()
        log_event(log, "kept next-hop connection refused a message: a new one answered",
                  logging.WARNING, filter=filter.name, refused=str(refused)[:120],
                  reply=str(reply)[:120])
        return reply

    async def _act(self, relayed: Relayed, verdict: Verdict, client: ForwardedClient) -> str:
        filter = self.filter
        if verdict.action == "deliver":
            return await self._deliver(relayed, verdict, client)
        # Not delivering: the next hop holds an open transaction for this message; cancel it.
        await self._cancel_downstream_transaction()
        if verdict.action == "quarantine":
            try:
                ident = await asyncio.to_thread(
                    filter.quarantine.store, filter.name, relayed.envelope, relayed.message,
                    verdict.label, verdict.reason)
            except QuarantineFull as full:
                metrics.QUARANTINE_FULL.labels(filter.name).inc()
                log_event(log, "quarantine full", logging.WARNING, filter=filter.name,
                          held=str(full), verdict=verdict.label)
                return quarantine_full_reply(filter.before_queue, verdict.reason)
            except OSError as error:
                log_event(log, "quarantine failed", logging.ERROR, error=str(error))
                return "451 4.3.0 Quarantine unavailable, please try again later"
            return f"250 2.0.0 Ok: quarantined as {ident} ({verdict.reason})"
        if verdict.action == "drop":
            return f"250 2.0.0 Ok: discarded ({verdict.reason})"
        return verdict.reply  # reject or tempfail

    async def _deliver(self, relayed: Relayed, verdict: Verdict,
                       client: ForwardedClient) -> str:
        filter, downstream = self.filter, self.downstream
        message = relayed.message if verdict.message is None else verdict.message
        if downstream is None or not downstream.connected:
            return filter.next_hop_failed(SmtpUnavailable("connection lost before DATA"))
        headers = list(verdict.headers)
        if filter.before_queue:
            headers.append((CLIENT_HEADER, client.header_value()))
        # Three pieces around the one copy of the message: no whole copy is made. The client
        # header is always removed: only ours may reach the milter.
        kept, body = split_headers(message, {*verdict.remove, CLIENT_HEADER})
        pieces: list[bytes | memoryview] = [header_block(headers), kept, memoryview(message)[body:]]
        try:
            reply = await downstream.data(pieces)
        except SmtpUnavailable as error:
            return filter.next_hop_failed(error)
        if reply.code // 100 == 4 and self.reused:
            again = await self._on_a_new_connection(relayed, pieces, reply)
            if again is not None:
                return str(again)
        return str(reply)
