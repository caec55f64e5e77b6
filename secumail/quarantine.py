"""Quarantine: messages kept instead of delivered, with their envelope and the verdict.

Each message is two files under `<dir>/<filter>/`: `<id>.eml` (the message as received)
and `<id>.json` (its `QuarantineRecord`: sender, recipients, client, verdict, reason,
time). Both are written to a temporary name, synced, then renamed, so a crash never leaves
half a message behind. The filters write it; the gateway's admin API reads, releases and
deletes through the same class.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from secumail.protocols.smtp import Envelope

QUARANTINE_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{12}$")
FILTER_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class QuarantineRecord:
    """What the `.json` file says of a quarantined message."""

    id: str
    filter: str
    verdict: str
    reason: str
    mail_from: str  # "" for the null sender ("<>" in records kept before 2026-12-08)
    rcpt_tos: tuple[str, ...]
    client: dict[str, str] = field(default_factory=dict)  # XFORWARD attributes
    size: int = 0
    time: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "rcpt_tos": list(self.rcpt_tos)}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> QuarantineRecord:
        """ValueError when the file is not such a record (written by hand, or damaged)."""
        raw: Any = json.loads(data)
        try:
            record = cls(
                id=str(raw["id"]), filter=str(raw["filter"]), verdict=str(raw["verdict"]),
                reason=str(raw["reason"]), mail_from=str(raw["mail_from"]),
                rcpt_tos=tuple(str(r) for r in raw["rcpt_tos"]),
                client={str(k): str(v) for k, v in dict(raw.get("client") or {}).items()},
                size=int(raw.get("size", 0)), time=float(raw.get("time", 0.0)),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a quarantine record: {error!r}") from None
        return record


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class QuarantineLimits:
    """What the quarantine may hold in all (every filter's and replica's, one volume)."""

    max_bytes: int
    max_messages: int
    max_age: float  # seconds: older messages are deleted when the next one is stored


class QuarantineFull(Exception):
    """Storing this message would take the quarantine past its limits."""


class Quarantine:
    # How long a replica trusts its count of what the volume holds before counting again
    # (other replicas store meanwhile): a full count reads every file's size.
    RECOUNT_SECONDS = 10.0

    def __init__(self, directory: str, limits: QuarantineLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.limits = limits
        self.clock = clock
        self._usage: tuple[int, int] | None = None  # messages, bytes
        self._counted = float("-inf")

    def usage(self) -> tuple[int, int]:
        """Messages and bytes held (their .eml files), old messages deleted on the way."""
        # Ids start with their UTC time: an id before this one is older than max_age.
        cutoff = "" if self.limits is None else time.strftime(
            "%Y%m%dT%H%M%S", time.gmtime(self.clock() - self.limits.max_age))
        messages = size = 0
        for folder in self._folders():
            for entry in os.scandir(folder):
                if not entry.name.endswith(".eml"):
                    continue
                if entry.name[:15] < cutoff:
                    Path(entry.path).unlink(missing_ok=True)
                    Path(entry.path).with_suffix(".json").unlink(missing_ok=True)
                    continue
                try:
                    size += entry.stat().st_size
                except FileNotFoundError:
                    continue  # released or deleted meanwhile
                messages += 1
        return messages, size

    def _folders(self) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(self.directory)
                    if e.is_dir() and FILTER_NAME.match(e.name) and e.name != "lost-acks"]
        except FileNotFoundError:
            return []

    def _make_room(self, size: int) -> None:
        assert self.limits is not None
        now = self.clock()
        if self._usage is None or now - self._counted >= self.RECOUNT_SECONDS:
            self._usage, self._counted = self.usage(), now
        messages, held = self._usage
        if messages + 1 > self.limits.max_messages or held + size > self.limits.max_bytes:
            raise QuarantineFull(f"{messages} messages, {held} bytes held (limits "
                                 f"{self.limits.max_messages}, {self.limits.max_bytes})")
        self._usage = (messages + 1, held + size)

    def store(self, filter_name: str, envelope: Envelope, message: bytes, verdict: str,
              reason: str) -> str:
        """The new message's id; QuarantineFull when the limits leave no room for it."""
        if self.limits is not None:
            self._make_room(len(message))
        folder = self.directory / filter_name
        folder.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        ident = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:12]
        record = QuarantineRecord(
            id=ident, filter=filter_name, verdict=verdict, reason=reason,
            mail_from=envelope.mail_from, rcpt_tos=tuple(envelope.rcpt_tos),
            client=dict(envelope.client), size=len(message), time=now,
        )
        _write_atomically(folder / f"{ident}.eml", message)
        _write_atomically(folder / f"{ident}.json", record.to_json())
        return ident

    # --- reading (the gateway's admin API) --------------------------------------------------

    def _meta_path(self, ident: str) -> Path | None:
        if not QUARANTINE_ID.match(ident):
            return None  # also what keeps `..` and slashes out of the paths below
        for path in self.directory.glob(f"*/{ident}.json"):
            if FILTER_NAME.match(path.parent.name):
                return path
        return None

    def records(self, filter_name: str | None = None, limit: int = 100,
                on_unreadable: Any = None) -> list[QuarantineRecord]:
        """Newest first (identifiers start with their UTC time); a file that is no record
        is skipped (and handed to `on_unreadable`, if given)."""
        metas = sorted(self.directory.glob("*/*.json"), key=lambda p: p.name, reverse=True)
        found = []
        for meta in metas:
            if filter_name is not None and meta.parent.name != filter_name:
                continue
            try:
                found.append(QuarantineRecord.from_json(meta.read_text()))
            except OSError:
                continue  # removed meanwhile
            except ValueError:
                if on_unreadable is not None:
                    on_unreadable(meta.stem)
                continue
            if len(found) >= limit:
                break
        return found

    def record(self, ident: str) -> QuarantineRecord | None:
        meta = self._meta_path(ident)
        if meta is None:
            return None
        try:
            return QuarantineRecord.from_json(meta.read_text())
        except (OSError, ValueError):
            return None

    def message(self, ident: str) -> bytes | None:
        meta = self._meta_path(ident)
        try:
            return meta.with_suffix(".eml").read_bytes() if meta else None
        except OSError:
            return None

    HEAD_CHUNK = 8192

    def head(self, record: QuarantineRecord, limit: int = 65_536) -> bytes:
        """The start of a listed record's message: read until its blank line (the end of
        its header fields) or `limit` bytes, never the whole of a big message; b"" when it
        is gone. The path is the record's own (its filter and id), with no search."""
        if not (QUARANTINE_ID.match(record.id) and FILTER_NAME.match(record.filter)):
            return b""
        data = b""
        try:
            with open(self.directory / record.filter / f"{record.id}.eml", "rb",
                      buffering=0) as handle:
                while len(data) < limit:
                    chunk = handle.read(min(self.HEAD_CHUNK, limit - len(data)))
                    if not chunk:
                        break
                    # Where the blank line may be: a CRLF CRLF across two chunks too.
                    searched = max(0, len(data) - 3)
                    data += chunk
                    if data.find(b"\r\n\r\n", searched) >= 0 or \
                            data.find(b"\n\n", searched) >= 0:
                        break
        except OSError:
            return b""
        return data

    def drop_recipient(self, ident: str, recipient: str) -> bool:
        """Take one recipient off a kept message (a user released or deleted it for
        themselves); the message goes once no recipient is left. False when the message or
        that recipient is not there (any more)."""
        meta = self._meta_path(ident)
        try:
            record = QuarantineRecord.from_json(meta.read_text()) if meta else None
        except (OSError, ValueError):
            record = None
        if meta is None or record is None:
            return False
        left = tuple(r for r in record.rcpt_tos if r.lower() != recipient.lower())
        if len(left) == len(record.rcpt_tos):
            return False
        if not left:
            return self.delete(ident)
        _write_atomically(meta, replace(record, rcpt_tos=left).to_json())
        return True

    def delete(self, ident: str) -> bool:
        meta = self._meta_path(ident)
        if meta is None:
            return False
        meta.with_suffix(".eml").unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return True
