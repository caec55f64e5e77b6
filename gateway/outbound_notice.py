"""Telling the admin, once, that a sender was held for sending far over its outbound limits.

The policy service holds it (secumail/outbound.py); the gateway, which can send mail, looks
for holds nobody was told of and mails SECUMAIL_ADMIN_ADDRESS through Postfix's re-injection
port (as a quarantine release goes), then marks them told. A mail that cannot be sent is
tried again at the next look: the metric secumail_policy_outbound_held says it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from gateway.own_mail import send_own_mail
from secumail.logs import log_event
from secumail.outbound import Held
from secumail.outbound_store import OutboundStore
from secumail.protocols.smtp import SmtpReply
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

NoticeSend = Callable[[str, bytes], Awaitable[SmtpReply]]  # (recipient, message)


def held_notice(held: Held, settings: Settings, console_url: str = "") -> bytes:
    """The admin's mail about one hold: who, why, since when, and how to release it."""
    mail = EmailMessage()
    mail["From"] = f"SecuMail <postmaster@{settings.domains[0]}>"
    mail["To"] = settings.admin_mailbox
    mail["Subject"] = f"SecuMail held outbound mail of {held.subject}"
    mail["Date"] = formatdate(held.since, usegmt=True)
    mail["Message-ID"] = make_msgid(domain=settings.hostname)
    mail["Auto-Submitted"] = "auto-generated"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.since))
    paragraphs = [
        f"SecuMail's policy service holds all outbound mail of {held.subject} since {since}: "
        f"it tried to send {held.reason} (SECUMAIL_OUTBOUND_LIMITS, "
        "SECUMAIL_OUTBOUND_HOLD_FACTOR).",
        "Its MTA is answered 450 4.7.1 and keeps the mail. A host or an account sending that "
        "much is often compromised: look at it before you release it.",
        "Release it in the console (Outbound) or with the admin API:",
    ]
    text = "\n\n".join(textwrap.fill(p, 72) for p in paragraphs)
    mail.set_content(f"{text}\n  DELETE /admin/outbound/held/{held.subject}\n")
    return mail.as_bytes()


class HoldNotifier:
    def __init__(self, settings: Settings, outbound: Callable[[], OutboundStore],
                 send: NoticeSend | None = None) -> None:
        self.settings = settings
        self.outbound = outbound
        self.send = send or self._send

    async def _send(self, recipient: str, message: bytes) -> SmtpReply:
        return await send_own_mail(self.settings, "", recipient, message)

    async def notify(self) -> int:
        """Mail the admin about every hold not told yet: how many were told."""
        told = 0
        store = self.outbound()
        for held in await store.holds():
            if held.notified:
                continue
            reply = await self.send(self.settings.admin_mailbox,
                                    held_notice(held, self.settings))
            if not reply.ok:
                log_event(log, "held sender notice refused", logging.WARNING,
                          subject=held.subject, reply=str(reply))
                continue
            await store.mark_notified(held.subject)
            log_event(log, "held sender notice sent", subject=held.subject,
                      to=self.settings.admin_mailbox)
            told += 1
        return told

    async def every(self, interval: float) -> None:
        while True:
            try:
                await self.notify()
            except Exception as error:  # the store or the next hop down: next time
                log_event(log, "held sender notice failed", logging.WARNING,
                          error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(interval)
