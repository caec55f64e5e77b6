"""`secumail-backup`: one archive of every volume that holds state, taken while the stack runs,
and its restore into a fresh stack.

    docker compose run --rm backup create            writes backups/secumail-<UTC time>.tar.gz
    docker compose run --rm backup restore FILE      into volumes that are empty (a fresh stack)
    docker compose run --rm backup show FILE         its manifest

The backup service mounts every state volume under /state/<volume> (compose.yaml). What is
taken, and how, so that a running stack gives a consistent copy:
- SQLite databases (the greylist, tracking): through SQLite's online backup API, never the
  files themselves (a copy of a database and its WAL taken apart is not a database);
- the Postfix queue: only queue files Postfix marked complete (the owner-execute bit it sets
  once a file is whole), with their bounce/defer/trace logs; Postfix's sockets and pid files
  are its own to remake. After a restore Postfix renames the files to its new inodes
  (`postsuper -s` at start, services/postfix/main.py);
- Redis: a BGSAVE asked of the running Redis (its password from the redis-auth volume), then
  its dump; with no Redis reachable, the last dump on disk, said in the manifest;
- Maildirs without their tmp/ (a delivery in progress), and every other file as it is.
A file that vanishes while it is read (a message delivered meanwhile) is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

STATE = Path("/state")
BACKUPS = Path("/backups")
# The volumes that hold state, as compose.yaml names them. Signatures (clamav-db), rule
# updates (sa-rules), Prometheus's history and other domains' MTA-STS policies (mta-sts)
# are downloaded or remade: not taken.
VOLUMES = ("mail", "queue", "quarantine", "dkim-keys", "dmarc", "greylist", "tracking", "tls",
           "bayes", "redis", "redis-auth")
MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
QUEUE_LOGS = ("bounce", "defer", "trace")
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
MANIFEST = "manifest.json"
# Redis runs with appendonly: at start it reads its AOF folder and ignores a dump.rdb, so the
# dump is restored as the AOF's base file (Redis 7's multi-part AOF takes an RDB base).
# Python's own checks on extraction where it has them (3.11.4 and later; the image's 3.11.2
# has not: the restore checks names and types itself).
HAS_FILTERS = hasattr(tarfile, "tar_filter")
REDIS_DUMP = "dump.rdb"
REDIS_AOF_BASE = "appendonlydir/appendonly.aof.1.base.rdb"
REDIS_AOF_MANIFEST = "appendonlydir/appendonly.aof.manifest"


@dataclass
class Manifest:
    version: str
    created: float
    volumes: dict[str, dict[str, int]] = field(default_factory=dict)  # files, bytes
    sqlite: list[str] = field(default_factory=list)
    queue_files: int = 0
    queue_incomplete_skipped: int = 0
    redis: str = "none"  # bgsave, on-disk, none
    vanished: int = 0


def version() -> str:
    try:
        return metadata.version("secumail")
    except metadata.PackageNotFoundError:
        return "unknown"


def wanted(volume: str, relative: Path, mode: int) -> bool:
    """Whether a file of a volume belongs in the backup."""
    parts = relative.parts
    if volume == "queue":
        if not parts or parts[0] not in (*MESSAGE_QUEUES, *QUEUE_LOGS):
            return False
        # A queue file still being written lacks the owner-execute bit Postfix sets last.
        return parts[0] in QUEUE_LOGS or bool(mode & stat.S_IXUSR)
    if volume == "mail":
        return "tmp" not in parts[:-1]
    if volume == "redis":
        return relative == Path(REDIS_DUMP)  # the fresh dump; its AOF is remade from it
    return not relative.name.endswith(SQLITE_SIDE_FILES)


def files(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            yield Path(directory) / name


def wanted_directory(volume: str, relative: Path) -> bool:
    """Directories go with their owners and modes (Postfix's queue folders, Maildirs, a
    volume's own root that its service's user must write in); Postfix remakes the rest."""
    if volume == "queue" and relative.parts:
        return relative.parts[0] in (*MESSAGE_QUEUES, *QUEUE_LOGS)
    if volume == "redis" and relative.parts:
        return False  # its AOF folder is remade from the dump
    return True


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def sqlite_copy(path: Path) -> bytes:
    """A consistent copy of a live SQLite database (its WAL folded in), by the backup API."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "copy.db"
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
        return target.read_bytes()


def redis_dump(state: Path, url: str, timeout: float = 60) -> str:
    """Ask the running Redis for a fresh dump (BGSAVE): "bgsave", or "on-disk" when none
    answers (the dump already in the volume is taken as it is)."""
    if not url.startswith(("redis://", "rediss://")):
        return "on-disk"
    import redis

    password_file = state / "redis-auth" / "password"
    password = password_file.read_text().strip() if password_file.exists() else None
    try:
        client = redis.Redis.from_url(url, password=password, socket_timeout=10)
        before = client.lastsave()
        client.bgsave()
        deadline = time.monotonic() + timeout
        while client.lastsave() == before:
            if time.monotonic() > deadline:
                return "on-disk"
            time.sleep(0.2)
        return "bgsave"
    except redis.RedisError:
        return "on-disk"


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes, like: os.stat_result) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), stat.S_IMODE(like.st_mode), int(like.st_mtime)
    info.uid, info.gid = like.st_uid, like.st_gid
    archive.addfile(info, io.BytesIO(data))


def create(state: Path, out_dir: Path, redis_url: str = "") -> tuple[Path, Manifest]:
    manifest = Manifest(version(), time.time())
    if (state / "redis").is_dir():
        manifest.redis = redis_dump(state, redis_url)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(manifest.created))
    target = out_dir / f"secumail-{stamp}.tar.gz"
    partial = target.with_suffix(".partial")
    with tarfile.open(partial, "w:gz", compresslevel=6) as archive:
        for volume in VOLUMES:
            root = state / volume
            if not root.is_dir():
                continue
            counts = manifest.volumes.setdefault(volume, {"files": 0, "bytes": 0})
            for directory, _, _ in os.walk(root):
                relative = Path(directory).relative_to(root)
                if wanted_directory(volume, relative):
                    name = f"volumes/{volume}" + (f"/{relative}" if relative.parts else "")
                    with contextlib.suppress(FileNotFoundError):
                        archive.add(directory, name, recursive=False)
            for path in files(root):
                relative = path.relative_to(root)
                try:
                    status = path.lstat()
                    if not stat.S_ISREG(status.st_mode) or not wanted(
                            volume, relative, status.st_mode):
                        if volume == "queue" and relative.parts[0] in MESSAGE_QUEUES \
                                and stat.S_ISREG(status.st_mode):
                            manifest.queue_incomplete_skipped += 1
                        continue
                    name = f"volumes/{volume}/{relative}"
                    if is_sqlite(path):
                        add_bytes(archive, name, sqlite_copy(path), status)
                        manifest.sqlite.append(f"{volume}/{relative}")
                    else:
                        archive.add(path, name, recursive=False)
                except FileNotFoundError:
                    manifest.vanished += 1
                    continue
                counts["files"] += 1
                counts["bytes"] += status.st_size
                if volume == "queue" and relative.parts[0] in MESSAGE_QUEUES:
                    manifest.queue_files += 1
        data = json.dumps(manifest.__dict__, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(manifest.created), 0o644
        archive.addfile(info, io.BytesIO(data))
    partial.rename(target)
    return target, manifest


def read_manifest(archive_path: Path) -> dict[str, object]:
    with tarfile.open(archive_path, "r:gz") as archive:
        try:
            member = archive.extractfile(MANIFEST)
        except KeyError:
            member = None
        if member is None:
            raise ValueError(f"{archive_path}: no {MANIFEST}: not a SecuMail backup")
        return json.loads(member.read())  # type: ignore[no-any-return]


def occupied(state: Path) -> list[str]:
    """The volumes that hold files already (a restore goes into a fresh stack)."""
    return [volume for volume in VOLUMES
            if (state / volume).is_dir() and any(p.is_file() for p in files(state / volume))]


def restore(archive_path: Path, state: Path, force: bool = False) -> dict[str, int]:
    """Write the archive's volumes back; files restored per volume. Refuses volumes that
    hold files unless `force` (their files are then replaced one by one, not wiped)."""
    read_manifest(archive_path)
    busy = occupied(state)
    if busy and not force:
        raise ValueError(f"volumes not empty: {', '.join(busy)} (restore into a fresh stack: "
                         "docker compose down -v first, or --force)")
    restored: dict[str, int] = {}
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if len(parts) < 2 or parts[0] != "volumes" or parts[1] not in VOLUMES:
                continue
            relative = Path(*parts[2:]) if len(parts) > 2 else Path()
            if parts[1] == "redis" and relative == Path(REDIS_DUMP):
                relative = Path(REDIS_AOF_BASE)
                aof_manifest = state / "redis" / REDIS_AOF_MANIFEST
                aof_manifest.parent.mkdir(parents=True, exist_ok=True)
                aof_manifest.write_text("file appendonly.aof.1.base.rdb seq 1 type b\n")
                for path in (aof_manifest.parent, aof_manifest):
                    os.chown(path, member.uid, member.gid)
            if not (member.isfile() or member.isdir()) or ".." in parts:
                continue  # a backup holds files and folders, nothing that points elsewhere
            member.name = str(Path(parts[1], relative))
            member.mode &= 0o1777  # never a setuid or setgid file
            if HAS_FILTERS:
                archive.extract(member, state, numeric_owner=True, filter="tar")
            else:
                archive.extract(member, state, numeric_owner=True)
            if member.isfile():
                restored[parts[1]] = restored.get(parts[1], 0) + 1
    return restored


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="secumail-backup", description=__doc__.split("\n")[0])
    parser.add_argument("--state", default=str(STATE), help="where the volumes are mounted")
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("create", help="write a backup of every state volume")
    made.add_argument("--out", default=str(BACKUPS))
    back = commands.add_parser("restore", help="restore a backup into empty volumes")
    back.add_argument("archive")
    back.add_argument("--force", action="store_true", help="even into volumes with files")
    show = commands.add_parser("show", help="print a backup's manifest")
    show.add_argument("archive")
    args = parser.parse_args(argv)
    state = Path(args.state)
    try:
        if args.command == "create":
            started = time.monotonic()
            target, manifest = create(state, Path(args.out),
                                      os.environ.get("SECUMAIL_GREYLIST_STORE", ""))
            print(json.dumps({"archive": str(target), "seconds":
                              round(time.monotonic() - started, 1), **manifest.__dict__}))
        elif args.command == "restore":
            restored = restore(Path(args.archive), state, args.force)
            print(json.dumps({"restored": restored}))
        else:
            print(json.dumps(read_manifest(Path(args.archive)), indent=2))
    except (OSError, ValueError, tarfile.TarError) as error:
        print(f"secumail-backup: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
