"""Quarantine: messages kept instead of delivered, with their envelope and the verdict.

Each message is two files under `<dir>/<filter>/`: `<id>.eml` (the message as received)
and `<id>.json` (sender, recipients, client, verdict, reason, time). Both are written to a
temporary name, synced, then renamed, so a crash never leaves half a message behind.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol


class Envelope(Protocol):
    @property
    def mail_from(self) -> str: ...

    @property
    def rcpt_tos(self) -> tuple[str, ...]: ...

    @property
    def client(self) -> dict[str, str]: ...


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class Quarantine:
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def store(self, filter_name: str, envelope: Envelope, message: bytes, verdict: str,
              reason: str) -> str:
        folder = self.directory / filter_name
        folder.mkdir(parents=True, exist_ok=True)
        ident = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]
        record: dict[str, Any] = {
            "id": ident, "filter": filter_name, "verdict": verdict, "reason": reason,
            "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
            "client": envelope.client, "size": len(message), "time": time.time(),
        }
        _write_atomically(folder / f"{ident}.eml", message)
        _write_atomically(folder / f"{ident}.json", json.dumps(record, indent=1).encode())
        return ident

    def list(self) -> list[dict[str, Any]]:
        records = []
        for meta in sorted(self.directory.glob("*/*.json")):
            records.append(json.loads(meta.read_text()))
        return records
