"""Users' quarantine digest: once a day, each recipient of ours hears of what was kept for them.

The digest (SECUMAIL_QUARANTINE_DIGEST) lists, per recipient in SECUMAIL_DOMAINS, the mail
quarantined since the last one: sender, subject, date, why, and two links, release and
delete. A link acts on one message for one recipient only (the others it was kept for keep
it), and needs no admin token: it is signed (HMAC-SHA256 with a key made from the admin
token, so a new token ends every link), it expires, and it is single-use by nature (the
recipient is taken off the message once it acted). Opening a link shows the message and a
button; only the button's POST acts, since mail scanners and previews open links on their own.
Digests go through Postfix's re-injection port, as the admin's notices do, and are signed
by the DKIM milter there like any mail of ours (gateway/own_mail.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Literal, cast, get_args

from pydantic import SecretStr

from gateway.auth import WrongTokens
from gateway.daily import every_day
from gateway.outbound_notice import NoticeSend
from gateway.own_mail import send_own_mail
from gateway.preview import subject
from secumail.logs import log_event
from secumail.protocols.smtp import SmtpRefused, SmtpReply, SmtpUnavailable
from secumail.quarantine import QUARANTINE_ID, Quarantine, QuarantineRecord
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

LINK_PATH = "/quarantine/link"
LINK_REQUESTS = (30, 60.0)  # link requests a client may make, and in how many seconds
MAX_LISTED = 50  # messages one digest lists; past that it says how many more
USERS_RELEASE = ("spamd",)  # the filters whose kept mail a user may release or delete
STATE_FILE = "digest-sent"  # in the quarantine volume: backed up, shared, kept on upgrade
Action = Literal["release", "delete"]
ACTIONS: tuple[str, ...] = get_args(Action)


# --- links -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    action: Action
    ident: str  # the quarantine id
    recipient: str
    expires: int  # Unix time


class BadLink(Exception):
    def __init__(self, reason: str, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class DigestLinks:
    """Makes and reads the links' tokens: `PAYLOAD.MAC`, both base64url."""

    MAC_BYTES = 18

    def __init__(self, admin_token: SecretStr) -> None:
        # A key of its own, for this purpose only: a link's MAC is never a console session's.
        self._key = hmac.new(admin_token.get_secret_value().encode(),
                             b"secumail quarantine digest links", "sha256").digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, "sha256").digest()[:self.MAC_BYTES]

    def make(self, link: Link) -> str:
        payload = f"{link.action}|{link.ident}|{link.recipient}|{link.expires}".encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def read(self, token: str, now: float) -> Link:
        """The link a token stands for; BadLink when it is not one of ours, or expired."""
        encoded, _, mac = token.partition(".")
        try:
            payload, presented = _unb64(encoded), _unb64(mac)
        except (binascii.Error, ValueError):
            raise BadLink("not a link of ours") from None
        if not hmac.compare_digest(presented, self._mac(payload)):
            raise BadLink("not a link of ours")
        action, ident, rest = payload.decode().split("|", 2)
        recipient, expires = rest.rsplit("|", 1)  # a local part may hold a "|"
        if action not in ACTIONS or not QUARANTINE_ID.match(ident) or not expires.isdigit():
            raise BadLink("not a link of ours")  # signed by us, so never seen: kept safe
        if int(expires) <= now:
            raise BadLink("this link has expired", expired=True)
        return Link(cast(Action, action), ident, recipient, int(expires))


# --- what a digest says -----------------------------------------------------------------------

def is_ours(address: str, domains: Iterable[str]) -> bool:
    return address.rpartition("@")[2].lower() in domains


def kept_for(records: Iterable[QuarantineRecord], domains: list[str],
             since: Callable[[str], float]) -> dict[str, list[QuarantineRecord]]:
    """Each recipient in `domains` with mail kept after `since(recipient)`, their messages
    newest first. Recipients elsewhere never get a digest (nor a link), and only what the
    spam filter kept is listed: a virus or a forbidden attachment is the admin's to release."""
    found: dict[str, list[QuarantineRecord]] = {}
    for record in records:
        if record.filter not in USERS_RELEASE:
            continue
        for recipient in {r.lower() for r in record.rcpt_tos}:
            if is_ours(recipient, domains) and record.time > since(recipient):
                found.setdefault(recipient, []).append(record)
    for listed in found.values():
        listed.sort(key=lambda r: r.time, reverse=True)
    return found


def one_line(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def digest_mail(recipient: str, kept: list[tuple[QuarantineRecord, str]], settings: Settings,
                links: DigestLinks, now: float) -> bytes:
    """The digest for one recipient: `kept` are their records, each with its Subject."""
    expires = int(now) + settings.quarantine_digest_link_days * 86400

    def url(action: Action, record: QuarantineRecord) -> str:
        token = links.make(Link(action, record.id, recipient, expires))
        return f"{settings.quarantine_digest_url}{LINK_PATH}?t={token}"

    mail = EmailMessage()
    mail["From"] = f"SecuMail quarantine <{settings.digest_sender}>"
    mail["To"] = recipient
    count = len(kept)
    mail["Subject"] = f"{count} message{'s' if count != 1 else ''} kept in quarantine for you"
    mail["Date"] = formatdate(now, usegmt=True)
    mail["Message-ID"] = make_msgid(domain=settings.hostname)
    mail["Auto-Submitted"] = "auto-generated"
    days = settings.quarantine_digest_link_days
    lines = [textwrap.fill(
        f"SecuMail kept these messages for {recipient} instead of delivering them. If one is "
        f"mail you want, open its Release link; Delete removes it. Each link acts on that "
        f"message for you alone and works for {days} day{'s' if days != 1 else ''}. "
        "Anything you do nothing about is deleted when the quarantine's time runs out.", 72),
        ""]
    for record, title in kept[:MAX_LISTED]:
        sender = record.mail_from.strip("<>") or "(no sender: a bounce)"
        lines += [
            f"From:    {one_line(sender)}",
            f"Subject: {one_line(title) or '(none)'}",
            f"Date:    {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(record.time))}",
            f"Why:     {one_line(record.verdict + ': ' + record.reason)}",
            f"Release: {url('release', record)}",
            f"Delete:  {url('delete', record)}",
            "",
        ]
    if count > MAX_LISTED:
        lines.append(f"... and {count - MAX_LISTED} more: ask {settings.admin_mailbox}.")
    mail.set_content("\n".join(lines) + "\n")
    return mail.as_bytes()


# --- sending, once a day ----------------------------------------------------------------------

@dataclass
class DigestRound:
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # recipient -> why


class Digests:
    """The users' digests: their links (and how often a client may open them), and the
    sending: at SECUMAIL_QUARANTINE_DIGEST_HOUR each day, or when asked.

    What was sent is remembered in the quarantine volume (STATE_FILE): the time the last
    round covered mail up to, and for each recipient whose digest could not be sent, the
    time theirs starts from, so that the next round tells them what they missed."""

    def __init__(self, settings: Settings, quarantine: Quarantine, links: DigestLinks,
                 send: NoticeSend | None = None, clock: Callable[[], float] = time.time
                 ) -> None:
        self.settings = settings
        self.quarantine = quarantine
        self.links = links
        self.requests = WrongTokens(*LINK_REQUESTS)  # every link opened, per client
        self.send = send or self._send
        self.clock = clock
        self.state_path = Path(settings.quarantine_dir) / STATE_FILE
        self._lock = asyncio.Lock()  # the daily round and an admin's "now" never overlap

    async def _send(self, recipient: str, message: bytes) -> SmtpReply:
        return await send_own_mail(self.settings, self.settings.digest_sender, recipient,
                                   message)

    def _state(self, now: float) -> tuple[float, dict[str, float]]:
        try:
            raw = json.loads(self.state_path.read_text())
            return float(raw["until"]), {str(k): float(v) for k, v in raw["missed"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return now - 86400, {}  # first digest: the last day's mail

    def _save(self, until: float, missed: dict[str, float]) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"until": until, "missed": missed}))
        temporary.replace(self.state_path)

    async def run(self) -> DigestRound:
        """One round: every recipient with mail kept since their last digest gets one."""
        async with self._lock:
            now = self.clock()
            until, missed = await asyncio.to_thread(self._state, now)
            records = await asyncio.to_thread(self.quarantine.records, None,
                                              self.settings.quarantine_max_messages)
            groups = kept_for(records, self.settings.domains,
                              lambda recipient: missed.get(recipient, until))
            done = DigestRound()
            for recipient, kept in sorted(groups.items()):
                listed = [(r, subject(await asyncio.to_thread(self.quarantine.head, r)))
                          for r in kept[:MAX_LISTED]] + [(r, "") for r in kept[MAX_LISTED:]]
                try:
                    reply = await self.send(recipient, digest_mail(
                        recipient, listed, self.settings, self.links, now))
                    why = "" if reply.ok else str(reply)
                except (SmtpRefused, SmtpUnavailable, OSError) as error:  # next round
                    why = f"{type(error).__name__}: {error}"
                if why:
                    done.failed[recipient] = why[:200]
                    missed.setdefault(recipient, until)
                    log_event(log, "quarantine digest not sent", logging.WARNING,
                              to=recipient, reason=why[:200])
                else:
                    done.sent.append(recipient)
                    missed.pop(recipient, None)
                    log_event(log, "quarantine digest sent", to=recipient, messages=len(kept))
            await asyncio.to_thread(self._save, now, missed)
            return done

    async def every_day(self) -> None:
        """At SECUMAIL_QUARANTINE_DIGEST_HOUR:00 UTC."""
        await every_day(lambda: self.settings.quarantine_digest_hour * 3600, self.run,
                        self.clock, "quarantine digest")
