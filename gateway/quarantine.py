"""Releasing a quarantined message (the filters' quarantine, secumail/quarantine.py).

Release hands the message to the next hop of the filter that quarantined it, over SMTP
with the original envelope and client attributes (XFORWARD): a message the ClamAV filter
kept goes on to the SpamAssassin filter, one the SpamAssassin filter kept goes back into
Postfix (10027), as if that filter had passed it. The files are removed only once the next
hop accepted the message; a refusal leaves them where they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from secumail.backend import BackendError
from secumail.chain import chain
from secumail.logs import log_event
from secumail.message import header_block
from secumail.netaddr import HostPort
from secumail.protocols.smtp import (
    Envelope,
    NextHop,
    SmtpRefused,
    SmtpReply,
    SmtpUnavailable,
    deliver,
)
from secumail.protocols.spamc import Kind
from secumail.quarantine import Quarantine, QuarantineRecord
from secumail.settings import Settings

RELEASE_HEADER = "X-SecuMail-Released"
log = logging.getLogger("secumail.gateway")

# (message, spam or ham) -> whether SpamAssassin's Bayes learned it (False: knew it already).
Learn = Callable[[bytes, Kind], Awaitable[bool]]


class ReleaseRefused(Exception):
    def __init__(self, step: str, reply: SmtpReply | str) -> None:
        super().__init__(f"{step}: {reply}")
        self.step = step
        self.reply = str(reply)


@dataclass(frozen=True)
class Released:
    next_hop: str
    reply: str
    learned: str  # what teaching it as ham gave: see QuarantineAdmin.teach


# (next hop, quarantine record, message) -> the next hop's answer to the end of DATA.
ReleaseSend = Callable[[HostPort, QuarantineRecord, bytes], Awaitable[SmtpReply]]


def next_hops(settings: Settings) -> dict[str, HostPort]:
    """Where each filter passes clean mail: where a message it kept is released to."""
    return {hop.service: hop.next_hop for hop in chain(settings) if hop.next_hop}


def release_headers(record: QuarantineRecord) -> list[tuple[str, str]]:
    """What a released message carries on top: that it was released, and why it was kept
    (a released virus must still say it is one)."""
    return [(RELEASE_HEADER, f"{record.id} by the gateway; kept by the {record.filter} filter"
                             f" as {record.verdict}: {record.reason}")]


class QuarantineAdmin:
    def __init__(self, quarantine: Quarantine, hops: dict[str, HostPort], hostname: str,
                 timeout: float, send: ReleaseSend | None = None,
                 learn: Learn | None = None) -> None:
        self.quarantine = quarantine
        self.hops = hops
        self.hostname = hostname
        self.timeout = timeout
        self.send = send or self._send
        self.learn = learn

    async def teach(self, message: bytes, kind: Kind, source: str) -> str:
        """Teach SpamAssassin's Bayes this message's kind: "learned as KIND", "known as
        KIND already", or "not learned: WHY". Never raises: a release is not undone because
        spamd could not learn from it."""
        if self.learn is None:
            return "not learned: no spamd to teach"
        try:
            learned = await self.learn(message, kind)
        except BackendError as error:
            log_event(log, "learning failed", logging.WARNING, kind=kind, source=source,
                      error=str(error)[:200])
            return f"not learned: {error}"
        log_event(log, "learned", kind=kind, source=source, new=learned)
        return f"learned as {kind}" if learned else f"known as {kind} already"

    async def release(self, ident: str, learn: bool = True) -> Released | None:
        """Deliver a kept message past the filter that kept it; then, unless `learn` is
        False, teach Bayes it is ham (the admin said it was wanted: mailcow's way)."""
        record = await asyncio.to_thread(self.quarantine.record, ident)
        message = await asyncio.to_thread(self.quarantine.message, ident)
        if record is None or message is None:
            return None
        target = self.hops.get(record.filter)
        if target is None:
            raise ReleaseRefused("release", f"no next hop known for filter {record.filter!r}")
        reply = await self.send(target, record, header_block(release_headers(record)) + message)
        if not reply.ok:
            raise ReleaseRefused("DATA", reply)
        await asyncio.to_thread(self.quarantine.delete, ident)
        learned = await self.teach(message, "ham", f"release {ident}") if learn \
            else "not learned: released without learning"
        return Released(str(target), str(reply), learned)

    async def _send(self, target: HostPort, record: QuarantineRecord, message: bytes
                    ) -> SmtpReply:
        # aiosmtpd records the null sender as "<>": it goes out as MAIL FROM:<>.
        envelope = Envelope(record.mail_from.removeprefix("<").removesuffix(">"),
                            record.rcpt_tos, {k.upper(): v for k, v in record.client.items()})
        try:
            return await deliver(NextHop(target), self.hostname, envelope, message,
                                 self.timeout)
        except SmtpRefused as refused:
            raise ReleaseRefused(refused.step, refused.reply) from None
        except SmtpUnavailable as error:
            raise ReleaseRefused("connection", str(error)) from None
