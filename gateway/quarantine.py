"""The quarantine the filters write (secumail/quarantine.py), seen from the admin API.

Release hands the message to the next hop of the filter that quarantined it, over SMTP
with the original envelope and client attributes (XFORWARD): a message the ClamAV filter
kept goes on to the SpamAssassin filter, one the SpamAssassin filter kept goes back into
Postfix (10027), as if that filter had passed it. The files are removed only once the next
hop accepted the message; a refusal leaves them where they are.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secumail.message import prepend_headers
from secumail.netaddr import HostPort
from secumail.settings import Settings
from secumail.smtp_client import NextHop, SmtpClient, SmtpReply, SmtpUnavailable

QUARANTINE_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{12}$")
FILTER_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
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
ReleaseSend = Callable[[HostPort, dict[str, Any], bytes], Awaitable[SmtpReply]]


def next_hops(settings: Settings) -> dict[str, HostPort]:
    """Where each filter passes clean mail: where a message it kept is released to."""
    return {"clamav": settings.clamav_next_hop, "spamd": settings.spamd_next_hop}


class QuarantineAdmin:
    def __init__(self, directory: str, hops: dict[str, HostPort], hostname: str,
                 timeout: float, send: ReleaseSend | None = None) -> None:
        self.directory = Path(directory)
        self.hops = hops
        self.hostname = hostname
        self.timeout = timeout
        self.send = send or self._send

    def _meta_path(self, ident: str) -> Path | None:
        if not QUARANTINE_ID.match(ident):
            return None  # also what keeps `..` and slashes out of the paths below
        for path in self.directory.glob(f"*/{ident}.json"):
            if FILTER_NAME.match(path.parent.name):
                return path
        return None

    def records(self, filter_name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first (identifiers start with their UTC time)."""
        metas = sorted(self.directory.glob("*/*.json"), key=lambda p: p.name, reverse=True)
        found = []
        for meta in metas:
            if filter_name is not None and meta.parent.name != filter_name:
                continue
            try:
                found.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue  # removed meanwhile, or half-written by hand
            if len(found) >= limit:
                break
        return found

    def record(self, ident: str) -> dict[str, Any] | None:
        meta = self._meta_path(ident)
        if meta is None:
            return None
        try:
            record: dict[str, Any] = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        return record

    def message(self, ident: str) -> bytes | None:
        meta = self._meta_path(ident)
        try:
            return meta.with_suffix(".eml").read_bytes() if meta else None
        except OSError:
            return None

    def delete(self, ident: str) -> bool:
        meta = self._meta_path(ident)
        if meta is None:
            return False
        meta.with_suffix(".eml").unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return True

    async def release(self, ident: str) -> Released | None:
        record, message = self.record(ident), self.message(ident)
        if record is None or message is None:
            return None
        target = self.hops.get(str(record.get("filter")))
        if target is None:
            filter_name = record.get("filter")
            raise ReleaseRefused("release", f"no next hop known for filter {filter_name!r}")
        message = prepend_headers(message, [(RELEASE_HEADER, f"{ident} by the gateway")])
        reply = await self.send(target, record, message)
        if not reply.ok:
            raise ReleaseRefused("DATA", reply)
        await asyncio.to_thread(self.delete, ident)
        return Released(str(target), str(reply))

    async def _send(self, target: HostPort, record: dict[str, Any], message: bytes
                    ) -> SmtpReply:
        smtp = SmtpClient(self.timeout)
        try:
            greeting = await smtp.connect(NextHop(target), self.hostname)
            if not greeting.ok:
                raise ReleaseRefused("EHLO", greeting)
            client = {str(k).upper(): str(v) for k, v in dict(record.get("client") or {}).items()}
            offered = set(smtp.extensions.get("XFORWARD", "").upper().split())
            attributes = [f"{k}={v}" for k, v in client.items() if k in offered and v]
            if attributes:
                await smtp.command("XFORWARD " + " ".join(attributes))  # best effort
            # aiosmtpd records the null sender as "<>": it goes out as MAIL FROM:<>.
            sender = str(record.get("mail_from") or "").removeprefix("<").removesuffix(">")
            reply = await smtp.command(f"MAIL FROM:<{sender}>")
            if not reply.ok:
                raise ReleaseRefused("MAIL", reply)
            for recipient in record.get("rcpt_tos") or []:
                reply = await smtp.command(f"RCPT TO:<{recipient}>")
                if not reply.ok:  # all or nothing: a partial release would be confusing
                    raise ReleaseRefused(f"RCPT {recipient}", reply)
            return await smtp.data(message)
        except SmtpUnavailable as error:
            raise ReleaseRefused("connection", str(error)) from None
        finally:
            await smtp.quit()
