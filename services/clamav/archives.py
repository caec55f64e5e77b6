"""Archives opened in memory with libarchive (zip, 7z, rar, tar, cab, iso, gzip...): each
member's name, whether it is encrypted, and its first bytes, for the attachment rules.

Bounded by what the caller allows: the members' declared sizes and the bytes actually
expanded count against one budget, and a member is read whole only when it is an archive
itself (to look inside it) or an OLE file (macros hide anywhere in one); of the others only
the head is read, so a bomb is refused on its sizes without being expanded.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

import libarchive
from libarchive import ffi
from libarchive.exception import ArchiveError

_is_encrypted = ffi.libarchive.archive_entry_is_encrypted
_is_encrypted.restype = ctypes.c_int
_is_encrypted.argtypes = [ctypes.c_void_p]

HEAD = 64 * 1024  # enough for every magic the rules know (an ISO's is at 32 KiB)

# What starts an archive libarchive can list, whatever the attachment's name says.
ARCHIVE_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
    b"MSCF", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x60\xea",  # ARJ
)
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Compressed single files (gzip, bzip2, xz): no member names, one stream ("raw").
_RAW_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def is_archive(head: bytes) -> bool:
    return head.startswith(ARCHIVE_MAGIC) or head[257:262] == b"ustar"


class ArchiveTrouble(Exception):
    """The archive cannot be checked: `rule` says why (encrypted, bomb, unreadable)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule


@dataclass
class Budget:
    """What one message's archives may cost in all."""

    expanded: int  # bytes, declared or read
    members: int

    def spend(self, size: int, detail: str) -> None:
        self.expanded -= max(size, 0)
        self.members -= 1
        if self.expanded < 0 or self.members < 0:
            raise ArchiveTrouble("archive-bomb", detail)


@dataclass(frozen=True)
class Member:
    name: str
    head: bytes  # the first HEAD bytes, or the whole member (archives and OLE files)


def members(data: bytes, budget: Budget) -> Iterator[Member]:
    """The files in an archive; ArchiveTrouble when one is encrypted, the budget runs out,
    or libarchive cannot read it (a damaged archive hides what it holds)."""
    formats = ("all", "raw") if data.startswith(_RAW_MAGIC) else ("all",)
    for number, format_name in enumerate(formats):
        try:
            yield from _read(data, format_name, budget)
            return
        except ArchiveError as error:
            text = str(error).lower()
            if "passphrase" in text or "encrypt" in text:
                raise ArchiveTrouble("encrypted-archive", "an encrypted member") from None
            if number == len(formats) - 1:
                reason = str(error).split(" (errno")[0]
                raise ArchiveTrouble("unreadable-archive", reason if reason != "None"
                                     else "libarchive cannot read it") from None


def _read(data: bytes, format_name: str, budget: Budget) -> Iterator[Member]:
    with libarchive.memory_reader(data, format_name=format_name) as archive:
        for entry in archive:
            if entry.isdir:
                continue
            try:
                name = entry.pathname or "data"
            except UnicodeDecodeError:  # a name in a legacy code page: the bytes, shown
                name = "?"
            declared = entry.size or 0
            budget.spend(declared, f"{name}: {declared} bytes expanded")
            if _is_encrypted(entry._entry_p):
                raise ArchiveTrouble("encrypted-archive", f"{name} is encrypted")
            yield Member(name, _content(entry, name, budget))


def _content(entry: libarchive.ArchiveEntry, name: str, budget: Budget) -> bytes:
    blocks: list[bytes] = []
    size = 0
    whole = False
    for block in entry.get_blocks():
        if not blocks:
            whole = is_archive(block) or block.startswith(OLE_MAGIC)
        blocks.append(block)
        size += len(block)
        if not whole and size >= HEAD:
            break
        if whole and size > budget.expanded:  # a member bigger than it said
            raise ArchiveTrouble("archive-bomb", f"{name}: more than it declared")
    return b"".join(blocks)
