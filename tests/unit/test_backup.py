"""secumail-backup on folders laid out as the volumes are (no Docker): what is taken, how a
live SQLite database and a Postfix queue being written are taken, and the restore."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from secumail import backup
from testkit.processes import free_port, require_binary, wait_for_port


def state_tree(root: Path) -> Path:
    """A little of every volume, a live SQLite database (WAL, open) among them."""
    state = root / "state"
    (state / "mail/example.org/alice/new").mkdir(parents=True)
    (state / "mail/example.org/alice/new/1.mx:2,").write_text("Subject: kept\n\nhello\n")
    (state / "mail/example.org/alice/tmp").mkdir()
    (state / "mail/example.org/alice/tmp/2.mx").write_text("half a deliv")  # in progress
    deferred = state / "queue/deferred/A"
    deferred.mkdir(parents=True)
    (deferred / "A1B2C3").write_text("a whole queue file")
    os.chmod(deferred / "A1B2C3", 0o700)  # complete: Postfix sets the owner-execute bit
    (state / "queue/incoming").mkdir()
    (state / "queue/incoming/D4E5F6").write_text("still being writ")
    os.chmod(state / "queue/incoming/D4E5F6", 0o600)
    (state / "queue/defer/A").mkdir(parents=True)
    (state / "queue/defer/A/A1B2C3").write_text("recipient=ops@elsewhere.test\n")
    (state / "queue/pid").mkdir()
    (state / "queue/pid/master.pid").write_text("1\n")
    (state / "dkim-keys/example.org").mkdir(parents=True)
    (state / "dkim-keys/example.org/s1.private").write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(state / "dkim-keys/example.org/s1.private", 0o600)
    (state / "greylist").mkdir()
    (state / "redis").mkdir()
    (state / "redis/dump.rdb").write_bytes(b"REDIS0010 the dump")
    (state / "redis/appendonlydir").mkdir()
    (state / "redis/appendonlydir/appendonly.aof.1.incr.aof").write_text("*3\r\n")
    return state


def live_database(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE triplets (key TEXT PRIMARY KEY)")
    db.executemany("INSERT INTO triplets VALUES (?)", [(f"t{n}",) for n in range(500)])
    return db  # left open: its rows are in the WAL, not yet in the main file


def test_a_running_stacks_state_is_taken_consistently(tmp_path: Path) -> None:
    state = state_tree(tmp_path)
    db = live_database(state / "greylist/greylist.sqlite")
    assert (state / "greylist/greylist.sqlite-wal").stat().st_size > 0
    archive_path, manifest = backup.create(state, tmp_path / "out")
    db.close()
    assert archive_path.name.startswith("secumail-") and archive_path.suffixes == [".tar", ".gz"]
    with tarfile.open(archive_path) as archive:
        names = {m.name for m in archive.getmembers() if m.isfile()}
        folders = {m.name for m in archive.getmembers() if m.isdir()}
        copy = tmp_path / "copy.sqlite"
        member = archive.extractfile("volumes/greylist/greylist.sqlite")
        assert member is not None
        copy.write_bytes(member.read())
        key_mode = archive.getmember("volumes/dkim-keys/example.org/s1.private").mode
    assert names == {
        "manifest.json", "volumes/mail/example.org/alice/new/1.mx:2,",
        "volumes/queue/deferred/A/A1B2C3", "volumes/queue/defer/A/A1B2C3",
        "volumes/dkim-keys/example.org/s1.private", "volumes/greylist/greylist.sqlite",
        "volumes/redis/dump.rdb"}
    # Folders with their owners and modes (Maildir's tmp too, empty); not Postfix's sockets
    # and pid files, nor Redis's AOF (remade from the dump).
    assert "volumes/mail/example.org/alice/tmp" in folders and "volumes/redis" in folders
    assert "volumes/queue/deferred/A" in folders and "volumes/queue" in folders
    assert not {"volumes/queue/pid", "volumes/redis/appendonlydir"} & folders
    # The WAL's rows are in the copy: the backup API, not the file as it lay on disk.
    assert sqlite3.connect(copy).execute("SELECT COUNT(*) FROM triplets").fetchone() == (500,)
    assert key_mode == 0o600
    assert manifest.sqlite == ["greylist/greylist.sqlite"]
    assert (manifest.queue_files, manifest.queue_incomplete_skipped) == (1, 1)
    assert manifest.redis == "on-disk"  # no Redis URL: the dump as it is
    assert backup.read_manifest(archive_path)["queue_files"] == 1


def test_a_restore_goes_into_empty_volumes_and_redis_reads_its_dump(tmp_path: Path) -> None:
    archive_path, _ = backup.create(state_tree(tmp_path), tmp_path / "out")
    fresh = tmp_path / "fresh"
    restored = backup.restore(archive_path, fresh)
    assert restored == {"mail": 1, "queue": 2, "dkim-keys": 1, "redis": 1}
    queued = fresh / "queue/deferred/A/A1B2C3"
    assert queued.read_text() == "a whole queue file"
    assert stat.S_IMODE(queued.stat().st_mode) == 0o700
    assert (fresh / "redis/appendonlydir/appendonly.aof.1.base.rdb").read_bytes() == \
        b"REDIS0010 the dump"
    assert (fresh / "redis/appendonlydir/appendonly.aof.manifest").read_text() == \
        "file appendonly.aof.1.base.rdb seq 1 type b\n"
    with pytest.raises(ValueError, match="volumes not empty: mail, queue"):
        backup.restore(archive_path, fresh)
    assert backup.restore(archive_path, fresh, force=True)["mail"] == 1


def test_what_is_no_backup_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as archive:
        archive.add(__file__, "volumes/mail/x")
    with pytest.raises(ValueError, match=r"no manifest\.json: not a SecuMail backup"):
        backup.restore(other, tmp_path / "fresh")


def test_redis_is_asked_for_a_fresh_dump_and_restored_from_it(tmp_path: Path) -> None:
    """A real redis-server with a password and appendonly, as compose runs it: BGSAVE, the
    dump taken, and a Redis started on the restored folder has the keys."""
    binary = require_binary("redis-server")
    state = state_tree(tmp_path)
    (state / "redis/dump.rdb").unlink()
    (state / "redis-auth").mkdir()
    (state / "redis-auth/password").write_text("s3cret\n")

    def redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", str(directory), "--appendonly", "yes",
                                 "--requirepass", "s3cret"], stdout=subprocess.DEVNULL)
        wait_for_port(port)
        return proc, port

    import redis as redis_py

    proc, port = redis(state / "redis")
    try:
        client = redis_py.Redis(port=port, password="s3cret")
        client.set("secumail:greylist:w", "kept")
        time.sleep(1.1)  # LASTSAVE has a one-second resolution
        archive_path, manifest = backup.create(state, tmp_path / "out",
                                               f"redis://127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        proc.wait(10)
    assert manifest.redis == "bgsave"
    fresh = tmp_path / "fresh"
    backup.restore(archive_path, fresh)
    proc, port = redis(fresh / "redis")
    try:
        assert redis_py.Redis(port=port, password="s3cret").get("secumail:greylist:w") == b"kept"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_command_line_prints_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    state = state_tree(tmp_path)
    backup.main(["--state", str(state), "create", "--out", str(tmp_path / "out")])
    made = json.loads(capsys.readouterr().out)
    assert made["queue_files"] == 1 and made["archive"].endswith(".tar.gz")
    with pytest.raises(SystemExit):
        backup.main(["--state", str(state), "restore", made["archive"]])
    assert "volumes not empty" in capsys.readouterr().err
