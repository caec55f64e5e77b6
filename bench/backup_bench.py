"""Backup benchmark (issue 32's target: a stack with 10,000 tracked events, 1,000 quarantined and
1,000 queued messages backed up in under 60 s while mail keeps flowing). Not a test: it
asserts nothing.

Lays out the volumes as the stack has them, in a temporary folder: a tracking database (the
gateway's TrackingStore) with --events events, --quarantined messages in the quarantine
(secumail.quarantine), --queued Postfix queue files marked complete (deferred), as many
delivered Maildir messages, a greylist database, DKIM keys. Then `secumail.backup.create`
runs while a writer thread keeps adding tracking events and queue files (mail flowing), and
the bench prints the seconds, the archive's size and what it took; then the same restore
into empty folders, timed.

    .venv/bin/python bench/backup_bench.py [--events 10000] [--quarantined 1000] [--queued 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
import types
from pathlib import Path

from gateway.tracking import StoredEvent, TrackingStore
from secumail import backup, tracking
from secumail.dkim_keys import keygen
from secumail.greylist_store import SqliteStore
from secumail.quarantine import Quarantine


def message(n: int, size: int = 2048) -> bytes:
    head = (f"From: sender{n}@remote.test\r\nTo: bob@example.org\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}@remote.test>\r\n\r\n").encode()
    return head + (b"lorem ipsum dolor sit amet " * (size // 27)) + b"\r\n"


def tracking_events(n: int, first: int = 0) -> list[StoredEvent]:
    events = []
    for i in range(first, first + n):
        events.append(StoredEvent(tracking.event(
            "policy", random.choice(["passed", "greylisted"]), "greylist: new triplet",
            client=f"203.0.113.{i % 250}", sender=f"sender{i}@remote.test",
            recipients=("bob@example.org",), queue_id=f"Q{i:010X}"), "policy-1"))
    return events


def lay_out(state: Path, events: int, quarantined: int, queued: int) -> None:
    store = TrackingStore(str(state / "tracking/tracking.db"), 7 * 86400, 2_000_000)
    for start in range(0, events, 1000):
        store.add("boot", start + 1000, tracking_events(min(1000, events - start), start))
    store.db.close()
    kept = Quarantine(str(state / "quarantine"))
    envelope = types.SimpleNamespace(mail_from="a@remote.test", rcpt_tos=("bob@example.org",),
                                     client={"ADDR": "203.0.113.7"})
    for n in range(quarantined):
        kept.store("clamav", envelope, message(n), "virus", "virus Test")
    for n in range(queued):
        folder = state / "queue/deferred" / f"{n % 16:X}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{n:011X}"
        path.write_bytes(message(n))
        os.chmod(path, 0o700)
        mailbox = state / "mail/example.org/bob/new"
        mailbox.mkdir(parents=True, exist_ok=True)
        (mailbox / f"{n}.mx:2,").write_bytes(message(n))
    grey = SqliteStore(str(state / "greylist/greylist.sqlite"))
    grey.db.executemany("INSERT INTO triplets VALUES (?, 1, 2, 0)",
                        [(f"198.51.100.0/24/s{n}@remote.test/bob@example.org",)
                         for n in range(events)])
    grey.db.close()
    keygen(state / "dkim-keys", "example.org", "s1", "rsa", 2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--quarantined", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="secumail-backup-bench-"))
    state = work / "state"
    started = time.monotonic()
    lay_out(state, args.events, args.quarantined, args.queued)
    print(f"laid out in {time.monotonic() - started:.1f} s: {args.events} events, "
          f"{args.quarantined} quarantined, {args.queued} queued and as many delivered")

    stop = threading.Event()
    written = [0]

    def mail_flowing() -> None:
        """Tracking events and queue files keep coming while the backup runs."""
        store = TrackingStore(str(state / "tracking/tracking.db"), 7 * 86400, 2_000_000)
        n = args.events
        while not stop.is_set():
            store.add("boot", n + 10, tracking_events(10, n))
            path = state / "queue/incoming" / f"{n:011X}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(message(n))
            os.chmod(path, 0o700)
            n += 10
            written[0] += 10
            time.sleep(0.01)
        store.db.close()

    writer = threading.Thread(target=mail_flowing)
    writer.start()
    started = time.monotonic()
    archive, manifest = backup.create(state, work / "out")
    seconds = time.monotonic() - started
    stop.set()
    writer.join()
    total = sum(v["files"] for v in manifest.volumes.values())
    print(f"backup: {seconds:.2f} s, {archive.stat().st_size / 2**20:.1f} MiB archive, "
          f"{total} files, queue files {manifest.queue_files}, SQLite "
          f"{', '.join(manifest.sqlite)}; {written[0]} events and queue files written "
          f"meanwhile (target: under 60 s)")
    started = time.monotonic()
    restored = backup.restore(archive, work / "fresh")
    print(f"restore: {time.monotonic() - started:.2f} s, {sum(restored.values())} files")
    os.system(f"rm -rf {work}")


if __name__ == "__main__":
    main()
