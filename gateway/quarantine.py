"""Releasing a quarantined message (the filters' quarantine, secumail/quarantine.py).

Release hands the message to the next hop of the filter that quarantined it, over SMTP
with the original envelope and client attributes (XFORWARD): a message the ClamAV filter
kept goes on to the SpamAssassin filter, one the SpamAssassin filter kept goes back into
Postfix (10027), as if that filter had passed it. The files are removed only once the next
hop accepted the message; a refusal leaves them where they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from secumail.chain import chain
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
from secumail.quarantine import Quarantine, QuarantineRecord
from secumail.settings import Settings

RELEASE_HEADER = "X-SecuMail-Released"


class ReleaseRefused(Exception):
    def __init__(self, step: str, reply: SmtpReply | str) -> None:
        super().__init__(f"{step}: {reply}")
        self.step = step
        self.reply = str(reply)


@dataclass(frozen=True)
class Released:
    next_hop: str
    reply: str


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
                 timeout: float, send: ReleaseSend | None = None) -> None:
        self.quarantine = quarantine
        self.hops = hops
        self.hostname = hostname
        self.timeout = timeout
        self.send = send or self._send

    async def release(self, ident: str) -> Released | None:
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
        return Released(str(target), str(reply))

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
