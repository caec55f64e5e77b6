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
TTL = 86400.0  # a client retries within seconds (before-queue) or hours (Postfix's queue)


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

    def pending(self) -> bool:
        """Whether any message waits for its retry (one directory read, usually empty);
        expired records go on the way."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return False
        now, found = time.time(), False
        for entry in entries:
            if not entry.name.endswith(SUFFIX):
                continue
            try:
                if now - entry.stat().st_mtime > self.ttl:
                    os.unlink(entry.path)
                else:
                    found = True
            except FileNotFoundError:
                pass  # another replica took it
        return found

    def take(self, key: str) -> str | None:
        """The reply recorded for this message, removed (once, across replicas), or None."""
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
