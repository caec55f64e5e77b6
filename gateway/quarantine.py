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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from secumail import tracking
from secumail.backend import BackendError
from secumail.chain import chain
from secumail.logs import log_event
from secumail.message import header_block, header_block_end
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
# Stores one of the gateway's own tracking events (Gateway.track); never raises.
Track = Callable[[tracking.Event], Awaitable[None]]
SERVICE = "gateway"  # the service the gateway's own events name
WITHOUT_LEARNING = "not learned: released without learning"


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
                 learn: Learn | None = None, track: Track | None = None) -> None:
        self.quarantine = quarantine
        self.hops = hops
        self.hostname = hostname
        self.timeout = timeout
        self.send = send or self._send
        self.learn = learn
        self.track = track  # None: no tracking (set by create_app, once the gateway is built)

    async def teach(self, message: bytes, kind: Kind, by: str,
                    kept: QuarantineRecord | None = None) -> str:
        """Teach SpamAssassin's Bayes this message's kind: "learned as KIND", "known as
        KIND already", or "not learned: WHY". Never raises: a release is not undone because
        spamd could not learn from it. `by`: who asked, as tracking shows it ("the admin,
        uploading it (API)"); `kept`: the message's quarantine record, when it is one (its
        envelope links the event to the message's path)."""
        if self.learn is None:
            result = "not learned: no spamd to teach"
        else:
            try:
                learned = await self.learn(message, kind)
            except BackendError as error:
                log_event(log, "learning failed", logging.WARNING, kind=kind, source=by,
                          error=str(error)[:200])
                result = f"not learned: {error}"
            else:
                log_event(log, "learned", kind=kind, source=by, new=learned)
                result = tracking.learned_result(kind, learned)
        await self._track(tracking.learning_event(SERVICE, kind, by, result, message,
                                                  **self._envelope(kept)))
        return result

    async def release(self, ident: str, learn: bool = True, via: str = "API",
                      recipient: str | None = None) -> Released | None:
        """Deliver a kept message past the filter that kept it; then, unless `learn` is
        False, teach Bayes it is ham (the admin said it was wanted: mailcow's way). `via`:
        how the admin asked (API, console), as tracking shows it. With `recipient` (a user's
        own digest link), the message goes to that recipient alone and stays kept for the
        others; None when it is not (any more) kept for them."""
        started = time.time()
        record = await asyncio.to_thread(self.quarantine.record, ident)
        message = await asyncio.to_thread(self.quarantine.message, ident)
        if record is None or message is None:
            return None
        if recipient is not None:
            mine = [r for r in record.rcpt_tos if r.lower() == recipient.lower()]
            if not mine:
                return None
            record = replace(record, rcpt_tos=tuple(mine[:1]))
        target = self.hops.get(record.filter)
        if target is None:
            raise ReleaseRefused("release", f"no next hop known for filter {record.filter!r}")
        reply = await self.send(target, record, header_block(release_headers(record)) + message)
        if not reply.ok:
            raise ReleaseRefused("DATA", reply)
        if recipient is None:
            await asyncio.to_thread(self.quarantine.delete, ident)
        else:
            await asyncio.to_thread(self.quarantine.drop_recipient, ident, recipient)
        final = str(reply).split("\r\n")[-1]
        await self._track(tracking.event(
            SERVICE, "released",
            f"{ident} by {recipient or 'the admin'} ({via}) to {target}: {final[:200]}"
            + ("" if learn else "; released without learning"),
            next_queue_id=tracking.queued_as(final),
            message_id=tracking.message_id_of(message, header_block_end(message)),
            at=started, **self._envelope(record)))
        learned = await self.teach(message, "ham", f"the admin, releasing {ident} ({via})",
                                   record) if learn else WITHOUT_LEARNING
        return Released(str(target), str(reply), learned)

    @staticmethod
    def _envelope(record: QuarantineRecord | None) -> dict[str, Any]:
        """What a quarantine record says of its message for tracking: its envelope, client
        and queue id, as the filter that kept it recorded them."""
        if record is None:
            return {}
        return {"client": record.client.get("ADDR", ""), "sender": record.mail_from,
                "recipients": record.rcpt_tos, "queue_id": record.client.get("IDENT", "")}

    async def _track(self, event: tracking.Event) -> None:
        if self.track is not None:
            await self.track(event)

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
