"""Archives opened in memory with libarchive (zip, 7z, rar, tar, cpio, cab, iso, zstd...):
each member's name, whether it is encrypted, and its content, for the attachment rules.

Any file may be an archive: libarchive's own format detection decides, not a magic at
offset 0 (a zip with junk in front of it, a v7 tar, a cpio, a tar.zst all open in the
tools users have). Everything is bounded by one `Budget` per message, charged with every
byte actually read (never with what a member declares: a compressed stream declares 0),
every member, and the CPU time of the thread that checks; a member is kept in memory
whole (to look inside it) only while the members held along its nesting fit in
`max_member`. A bigger member is read through, charged, and judged by its head and tail.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from libarchive import ffi
from libarchive.entry import ArchiveEntry
from libarchive.exception import ArchiveError
from libarchive.read import ArchiveRead

_is_encrypted = ffi.libarchive.archive_entry_is_encrypted
_is_encrypted.restype = ctypes.c_int
_is_encrypted.argtypes = [ctypes.c_void_p]

HEAD = 64 * 1024  # enough for every magic the rules know (an ISO's is at 32 KiB)
ZIP_TAIL = 65_557  # a zip's end-of-central-directory record: 22 bytes, a 64 KiB comment

# What a mail client's user can open as an archive. Not mtree (a text listing whose
# entries name files on this host) nor raw (any data at all); no filter that runs a program.
_FORMATS = ("7zip", "ar", "cab", "cpio", "empty", "iso9660", "lha", "rar", "rar5", "tar",
            "xar", "zip")
_FILTERS = ("bzip2", "compress", "gzip", "lz4", "lzip", "lzma", "uu", "xz", "zstd")

# Strong signs of an archive: a part that has one and cannot be read is refused.
ARCHIVE_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
    b"MSCF", b"\x60\xea",  # ARJ
)
# Compressed single files: no member names, one stream (libarchive's "raw" format).
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",  # zstd
                    b"\x04\x22\x4d\x18", b"LZIP", b"\x1f\x9d")  # lz4, lzip, compress
ARCHIVE_EXTENSIONS = frozenset("""
    zip zipx 7z rar tar tgz gz bz2 tbz tbz2 xz txz zst tzst lz4 lz lzma z cab arj lzh lha
    cpio ar xar
""".split())
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def claims_archive(head: bytes | bytearray, tail: bytes | bytearray,
                   names: tuple[str, ...] = ()) -> bool:
    """Whether a file's first bytes, its last, or a name say it is an archive: then it
    must be readable."""
    return (head.startswith(ARCHIVE_MAGIC) or head.startswith(COMPRESSED_MAGIC)
            or head[257:262] == b"ustar" or zip_end_in(tail[-ZIP_TAIL:])
            or any(name.lower().rstrip(". ").rpartition(".")[2] in ARCHIVE_EXTENSIONS
                   for name in names))


def zip_end_in(tail: bytes | bytearray) -> bool:
    """A zip's end-of-central-directory record in the last bytes of a file (where 7-Zip
    and libarchive look for a zip, whatever comes before it)."""
    return b"PK\x05\x06" in tail


class ArchiveTrouble(Exception):
    """The archive cannot be checked: `rule` says why (encrypted, bomb, unreadable)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule


class BudgetSpent(ArchiveTrouble):
    """The message as a whole costs more than its budget: nothing after this is checked."""

    def __init__(self, detail: str) -> None:
        super().__init__("archive-bomb", detail)


class Budget:
    """What checking one message may cost in all: bytes read (decoded parts and every
    expanded byte), members, CPU seconds of the checking thread; and the bytes of members
    held in memory at once along one nesting."""

    def __init__(self, max_bytes: int, max_members: int, max_member: int,
                 max_seconds: float) -> None:
        self.bytes_left = max_bytes
        self.members_left = max_members
        self.held_left = max_member
        self.max_seconds = max_seconds
        self._deadline = time.thread_time() + max_seconds

    def charge(self, size: int, where: str) -> None:
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise BudgetSpent(f"{where}: expands past the limit")
        if time.thread_time() > self._deadline:
            raise BudgetSpent(f"{where}: more than {self.max_seconds:g} CPU seconds to check")

    def member(self, where: str) -> None:
        self.members_left -= 1
        if self.members_left < 0:
            raise BudgetSpent(f"{where}: more members than the limit")
        self.charge(0, where)


@dataclass(frozen=True)
class Member:
    name: str
    content: bytes | bytearray  # whole, or the first HEAD bytes when `whole` is False
    whole: bool


def members(data: bytes | bytearray, budget: Budget, claimed: bool, path: str = "",
            start: int = 0, end: int | None = None) -> Iterator[Member]:
    """The files in `data` if libarchive finds an archive there; nothing if it finds none.
    ArchiveTrouble when a member is encrypted, the budget runs out, or an archive cannot be
    read: one libarchive recognised, or one `claimed` (by a magic, a zip's end record or
    its name), hides what it holds. `path`: where the archive is, for the messages;
    `data[start:end]` is the file, read in place (a part of a message is not copied)."""
    end = len(data) if end is None else end
    compressed = data.startswith(COMPRESSED_MAGIC, start)
    kinds = ("archive", "compressed") if compressed else ("archive",)
    for kind in kinds:
        read_any = False
        try:
            for member in _read(data, start, end, kind, budget, path):
                read_any = True
                yield member
            return
        except ArchiveError as error:
            text = str(error).split(" (errno")[0]
            if "passphrase" in text.lower() or "encrypt" in text.lower():
                raise ArchiveTrouble("encrypted-archive", "an encrypted member") from None
            if read_any or "Unrecognized archive format" not in text:
                raise ArchiveTrouble("unreadable-archive", text if text != "None"
                                     else "libarchive cannot read it") from None
    if claimed:
        raise ArchiveTrouble("unreadable-archive", "libarchive cannot read it")


@contextmanager
def _reader(data: bytes | bytearray, start: int, end: int, kind: str) -> Iterator[ArchiveRead]:
    archive_p = ffi.read_new()
    try:
        for filter_name in _FILTERS:
            ffi.get_read_filter_function(filter_name)(archive_p)
        for format_name in (_FORMATS if kind == "archive" else ("raw",)):
            ffi.get_read_format_function(format_name)(archive_p)
        # The buffer is lent to libarchive as it is, not copied (`buffer` keeps it alive).
        buffer = (ctypes.c_char * len(data)).from_buffer(data) \
            if isinstance(data, bytearray) else ctypes.c_char_p(data)
        address = ctypes.cast(buffer, ctypes.c_void_p).value or 0
        ffi.read_open_memory(archive_p, address + start, end - start)
        yield ArchiveRead(archive_p)
    finally:
        ffi.read_free(archive_p)


def _read(data: bytes | bytearray, start: int, end: int, kind: str, budget: Budget,
          path: str) -> Iterator[Member]:
    with _reader(data, start, end, kind) as archive:
        for entry in archive:
            if entry.isdir:
                continue
            try:
                name = entry.pathname or "data"
            except UnicodeDecodeError:  # a name in a legacy code page: the bytes, shown
                name = "?"
            where = f"{path} > {name}" if path else name
            budget.member(where)
            if (entry.size or 0) > budget.bytes_left:  # refused on its word, unread
                raise ArchiveTrouble("archive-bomb", f"{name}: {entry.size} bytes expanded")
            if _is_encrypted(entry._entry_p):
                raise ArchiveTrouble("encrypted-archive", f"{name} is encrypted")
            member = _content(entry, name, where, budget)
            yield member
            if member.whole:  # looked into by now: the room it held is free again
                budget.held_left += len(member.content)


def _content(entry: ArchiveEntry, name: str, where: str, budget: Budget) -> Member:
    """The member whole if it fits in the room left to hold members; else its head, the
    rest read through (charged), and ArchiveTrouble if it was an archive too big to open."""
    content = bytearray()
    tail = b""
    whole = True
    for block in entry.get_blocks(block_size=HEAD):
        budget.charge(len(block), where)
        if whole and len(content) + len(block) > budget.held_left:
            whole = False
            tail = bytes(content[-ZIP_TAIL:])
            del content[HEAD:]
        if whole:
            content += block
        else:
            if len(content) < HEAD:
                content += block[:HEAD - len(content)]
            tail = (tail + block)[-ZIP_TAIL:]
    if not whole:
        if claims_archive(content, tail):
            raise ArchiveTrouble("archive-bomb", f"{name}: an archive too big to look into")
        return Member(name, bytes(content[:HEAD]), False)
    budget.held_left -= len(content)
    return Member(name, content, True)
