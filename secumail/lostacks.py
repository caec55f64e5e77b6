"""Messages delivered whose 250 never reached the client: their retry is not delivered again.

RFC 1047's duplicate: a relay's next hop accepted a message, but its own client vanished
(killed, cut off) before hearing the 250, so it sends the message again. A filter that sees
this happen (its client reset the connection with our 250 unread, or left while the next
hop's 250 was on its way, which the filter then still reads) records the message here;
when the same message comes again, to any replica of either filter sharing the directory
(the quarantine volume), it is answered 250 and not passed on.

The same message: the same Message-ID, envelope and body. The header block is left out, since
each hop's Received and our own headers differ between the two tries.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from secumail.message import header_block_end

SUFFIX = ".delivered"  # not .json: the quarantine's own files are <filter>/<id>.json
AWAITED = ".awaited"  # the next hop has not answered yet (see LostAcks.await_answer)
TTL = 86400.0  # a client retries within seconds (before-queue) or hours (Postfix's queue)
AWAITED_TTL = 600.0  # longer than any next hop takes to answer (SECUMAIL_RELAY_TIMEOUT)
# What `take` says of a message whose first copy's fate is not known yet.
STILL_AWAITED = "awaited"


def message_key(message_id: str, sender: str, recipients: tuple[str, ...] | list[str],
                message: bytes) -> str:
    digest = hashlib.sha256()
    for part in (message_id, sender, *sorted(recipients)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(memoryview(message)[header_block_end(message):])
    return digest.hexdigest()


class LostAcks:
    """One file per message delivered without its 250 reaching the client, holding the next
    hop's reply; expired after TTL."""

    def __init__(self, directory: Path, ttl: float = TTL) -> None:
        self.directory = directory
        self.ttl = ttl

    def record(self, key: str, reply: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / (key + SUFFIX)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(reply[:200])
        os.replace(temporary, path)  # whole or absent, for a replica reading it meanwhile
        self.forget(key)

    def await_answer(self, key: str) -> None:
        """The client left while the next hop's answer was on its way: until that answer
        is read (then `record` or `forget`), a retry must wait, or it would race the first
        copy and be delivered beside it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / (key + AWAITED)).write_text("")

    def forget(self, key: str) -> None:
        """The next hop did not take the first copy: its retry is a message like any."""
        (self.directory / (key + AWAITED)).unlink(missing_ok=True)

    def pending(self) -> bool:
        """Whether any message waits for its retry (one directory read, usually empty);
        expired records go on the way."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return False
        now, found = time.time(), False
        for entry in entries:
            if not entry.name.endswith((SUFFIX, AWAITED)):
                continue
            ttl = self.ttl if entry.name.endswith(SUFFIX) else AWAITED_TTL
            try:
                if now - entry.stat().st_mtime > ttl:
                    os.unlink(entry.path)
                else:
                    found = True
            except FileNotFoundError:
                pass  # another replica took it
        return found

    def take(self, key: str) -> str | None:
        """The reply recorded for this message, removed (once, across replicas); or
        STILL_AWAITED while its first copy's answer is awaited (kept); or None."""
        awaited = self.directory / (key + AWAITED)
        try:
            if time.time() - awaited.stat().st_mtime <= AWAITED_TTL:
                return STILL_AWAITED
        except FileNotFoundError:
            pass
        path = self.directory / (key + SUFFIX)
        claimed = path.with_suffix(f".{os.getpid()}.taken")
        try:
            os.rename(path, claimed)  # atomic: of two replicas, one gets it
        except FileNotFoundError:
            return None
        try:
            return claimed.read_text()
        finally:
            claimed.unlink(missing_ok=True)
