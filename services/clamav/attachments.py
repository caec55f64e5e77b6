"""Attachments no mail user should receive: the rules, as plain functions over the MIME tree.

ClamAV knows malware it has seen; a new executable passes it. So, as amavis' banned files,
Proxmox Mail Gateway's attachment rules and Rspamd's mime_types do, files are refused by
kind, judged by their names and by their content (magic bytes), never by the MIME type the
sender declared, and the same inside archives (zip, 7z, rar, tar, cab...):

    blocked-extension   a name ending in what a mail client would run (.exe .js .lnk...)
    double-extension    the same behind a harmless-looking one (invoice.pdf.exe)
    deceptive-name      a name with bidirectional controls (invoice<RLO>fdp.exe shows as
                        invoiceexe.pdf)
    executable-content  a program whatever its name: PE (MZ), ELF, Mach-O, Windows shortcut
    disk-image          an ISO 9660 image (mounted with one click, then run)
    office-macro        an Office file with VBA macros (OLE, or OOXML with vbaProject.bin)
    encrypted-archive   an archive whose members cannot be read, so not checked
    unreadable-archive  an archive libarchive cannot read (damaged on purpose, often)
    archive-bomb        more expanded bytes or members than the limits, or nesting too deep
    mime-too-complex    more MIME parts, or deeper nesting, than the limits

Any rule or extension can be allowed (SECUMAIL_ATTACHMENT_ALLOW), extensions added
(SECUMAIL_ATTACHMENT_BLOCK). No I/O here; archives are read in memory (archives.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from secumail.mime import MimeTooComplex, Part, decode_body, transfer_encoding, walk
from services.clamav.archives import (
    HEAD,
    OLE_MAGIC,
    ZIP_TAIL,
    ArchiveTrouble,
    Budget,
    BudgetSpent,
    claims_archive,
    members,
)

# What Windows, macOS or a mail client would run, install, mount or open as a program.
DEFAULT_BLOCKED = frozenset("""
    exe scr com bat cmd pif cpl dll sys drv ocx msi msp mst msc msix msixbundle appx
    appxbundle application gadget jar js jse vbs vbe wsf wsh wsc hta ps1 psm1 psd1 ps1xml
    ps2 ps2xml psc1 psc2 lnk url scf inf reg chm hlp iso img vhd vhdx xll xlam ppam one
    settingcontent-ms library-ms search-ms website diagcab cab app command sh
""".split())
# Names a double extension hides behind.
_DOCUMENT_LIKE = frozenset("""
    pdf doc docx xls xlsx ppt pptx odt ods odp rtf txt csv jpg jpeg png gif bmp tif tiff
    zip rar 7z htm html xml eml mp3 mp4 avi mov wav
""".split())
RULES = ("blocked-extension", "double-extension", "deceptive-name", "executable-content",
         "disk-image", "office-macro", "encrypted-archive", "unreadable-archive",
         "archive-bomb", "mime-too-complex")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_EXECUTABLE_MAGIC = (
    b"MZ", b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe", b"L\x00\x00\x00\x01\x14\x02\x00",  # the last: a .lnk shortcut
)
_VBA_PROJECT = "_VBA_PROJECT".encode("utf-16-le")
_UNPRINTABLE = re.compile(r"[^ -~]")
_UUENCODED = re.compile(rb"^begin [0-7]{3,4} ([^\r\n]+)\r?$", re.M)
# A line libarchive's uu filter starts decoding at (its "begin" and "begin-base64" lines).
_UU_START = re.compile(rb"^begin(?:-base64)? +[0-7]", re.M)
# Bytes no text has (NUL, the C0 controls but tab, line ends, form feed and ESC, DEL): every
# binary format libarchive reads has some in its first 64 KiB.
_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
# The archives libarchive reads that may be all text: ar, cpio's ASCII headers (odc, newc).
_TEXT_ARCHIVE_MAGIC = (b"!<arch>", b"0707")
# At most this much mail is checked on the event loop (check(inline=True)), no archive in
# it: what it costs (hundreds of microseconds) is less than handing it to a thread.
INLINE_MAX_BYTES = 256 * 1024
INLINE_MAX_PARTS = 20


class NeedsThread(Exception):
    """check(inline=True) met what must be checked in a thread: an archive to read, or
    more mail than INLINE_MAX_BYTES and INLINE_MAX_PARTS."""


@dataclass(frozen=True)
class AttachmentPolicy:
    blocked: frozenset[str]  # extensions, lower case, no dot
    allowed_rules: frozenset[str]
    max_depth: int  # archives inside archives
    max_expanded: int  # bytes read from a message's parts and archives, in all
    max_parts: int  # MIME parts of a message; members of its archives
    max_member: int = 16 * 2**20  # bytes of archive members held at once to look inside
    max_seconds: float = 10.0  # CPU seconds to check one message

    @classmethod
    def from_lists(cls, block: list[str], allow: list[str], max_depth: int,
                   max_expanded: int, max_parts: int, max_member: int = 16 * 2**20,
                   max_seconds: float = 10.0) -> AttachmentPolicy:
        allowed = {item.lower().lstrip(".") for item in allow}
        blocked = (DEFAULT_BLOCKED | {item.lower().lstrip(".") for item in block}) - allowed
        return cls(frozenset(blocked), frozenset(allowed & set(RULES)), max_depth,
                   max_expanded, max_parts, max_member, max_seconds)

    def budget(self) -> Budget:
        return Budget(self.max_expanded, self.max_parts, self.max_member, self.max_seconds)


@dataclass(frozen=True)
class Finding:
    rule: str
    path: str  # where: `invoice.zip > docs/invoice.pdf.exe`
    part: Part | None  # the MIME part that holds it (None: the message as a whole)

    def describe(self) -> str:
        """For the log, the SMTP reply and a header: printable ASCII, names cut short
        (they are the sender's, who may put line breaks or a boundary in them)."""
        return printable(f"{self.rule}: {self.path}" if self.path else self.rule)


def printable(text: str) -> str:
    """Printable ASCII, 200 characters at most: a sender's file name made safe to show."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _UNPRINTABLE.sub("?", text)[:200]


def name_rule(name: str, blocked: frozenset[str]) -> str | None:
    """The rule a file name breaks, if any."""
    if _BIDI.search(name):
        return "deceptive-name"
    # Windows drops trailing dots and spaces: `evil.exe. ` runs as evil.exe.
    parts = name.strip().rstrip(". ").lower().split(".")
    if len(parts) < 2 or parts[-1].strip() not in blocked:
        return None
    if len(parts) >= 3 and parts[-2].strip() in _DOCUMENT_LIKE:
        return "double-extension"
    return "blocked-extension"


def content_rule(head: bytes | bytearray) -> str | None:
    """The rule a file's first bytes break, if any (`head` whole for OLE files)."""
    if head.startswith(_EXECUTABLE_MAGIC):
        return "executable-content"
    if head[0x8001:0x8006] == b"CD001" or head[0x8801:0x8806] == b"CD001":
        return "disk-image"
    if head.startswith(OLE_MAGIC) and _VBA_PROJECT in head:
        return "office-macro"
    return None


def check(message: bytes, policy: AttachmentPolicy, inline: bool = False) -> list[Finding]:
    """Every rule the message's attachments break, that the policy does not allow. A
    message that costs more than its budget is one finding for the message as a whole
    (refused or quarantined, never stripped: what follows was not checked).
    `inline`: the caller's thread is an event loop, which must not wait on libarchive or a
    big message; NeedsThread then, and the caller checks the message in a thread."""
    if inline and len(message) > INLINE_MAX_BYTES:
        raise NeedsThread(f"{len(message)} bytes")
    findings: list[Finding] = []
    budget = policy.budget()
    try:
        parts = list(walk(message, INLINE_MAX_PARTS if inline else policy.max_parts))
    except MimeTooComplex as error:
        if inline:
            raise NeedsThread(str(error)) from None
        return _allowed([Finding("mime-too-complex", str(error), None)], policy)
    try:
        for part in parts:
            findings.extend(_check_part(message, part, policy, budget, inline))
    except BudgetSpent as spent:
        findings.append(Finding(spent.rule, str(spent), None))
    # One name read two ways is one finding.
    unique = {(f.rule, f.path, f.part and f.part.start): f for f in findings}
    return _allowed(list(unique.values()), policy)


def _allowed(findings: list[Finding], policy: AttachmentPolicy) -> list[Finding]:
    return [f for f in findings if f.rule not in policy.allowed_rules]


def _check_part(message: bytes, part: Part, policy: AttachmentPolicy,
                budget: Budget, inline: bool) -> list[Finding]:
    names = part.filenames
    label = part.filename or (names[0] if names else part.content_type)
    findings = [Finding(rule, name, part) for name in names
                if (rule := name_rule(name, policy.blocked))]
    if part.content_type.startswith("text/") and not names:
        # Old clients put files in the text itself (uuencode): their names are checked, in
        # the message itself when the text is not encoded (no copy of a big body).
        if transfer_encoding(part):
            lines = _UUENCODED.finditer(decode_body(message, part))
        elif message.find(b"begin ", part.body_start, part.end) >= 0:  # 10x faster
            lines = _UUENCODED.finditer(message, part.body_start, part.end)
        else:
            lines = iter(())
        for found in lines:
            encoded_name = found.group(1).decode("latin-1").strip()
            if rule := name_rule(encoded_name, policy.blocked):
                findings.append(Finding(rule, encoded_name, part))
    # Every part's content, whatever its type and name say: a program, or an archive
    # libarchive can open (what a user's archive tool would open).
    if transfer_encoding(part):
        data, start, end = decode_body(message, part), 0, None
    else:  # read in place: a big text is not copied
        data, start, end = message, part.body_start, part.end
    budget.charge((end or len(data)) - start, label)
    findings.extend(_check_file(data, label, names, part, policy, budget, 0, start, end,
                                inline))
    return findings


def _check_file(data: bytes | bytearray, path: str, names: tuple[str, ...], part: Part,
                policy: AttachmentPolicy, budget: Budget, depth: int, start: int = 0,
                end: int | None = None, inline: bool = False) -> list[Finding]:
    """The rules `data[start:end]` breaks: by its content, and inside it if it opens as an
    archive."""
    end = len(data) if end is None else end
    head = data[start:min(end, start + HEAD)]
    if rule := content_rule(data[start:end] if head.startswith(OLE_MAGIC) else head):
        return [Finding(rule, path, part)]  # OLE files are read whole: macros hide anywhere
    findings: list[Finding] = []
    claimed = claims_archive(head, data[max(start, end - ZIP_TAIL):end], names)
    if not claimed and not may_be_archive(data, start, end, head):
        return findings  # text: nothing libarchive would open (it costs a thread's hand-off)
    if inline:
        raise NeedsThread(path)
    try:
        for member in members(data, budget, claimed, path, start, end):
            if depth >= policy.max_depth:
                raise ArchiveTrouble("archive-bomb",
                                     f"archives nested deeper than {policy.max_depth}")
            inner = f"{path} > {member.name}"
            if member.name.lower().endswith("vbaproject.bin"):  # OOXML with macros
                findings.append(Finding("office-macro", path, part))
            elif rule := name_rule(member.name, policy.blocked):
                findings.append(Finding(rule, inner, part))
            if member.whole:
                findings.extend(_check_file(member.content, inner, (member.name,), part,
                                            policy, budget, depth + 1))
            elif rule := content_rule(member.content):
                findings.append(Finding(rule, inner, part))
    except BudgetSpent:
        raise
    except ArchiveTrouble as trouble:
        findings.append(Finding(trouble.rule, f"{path}: {trouble}", part))
    return findings


def may_be_archive(data: bytes | bytearray, start: int, end: int,
                   head: bytes | bytearray) -> bool:
    """Whether libarchive might find an archive in `data[start:end]` (`head` its first
    HEAD bytes): binary data, a text archive (ar, ASCII cpio), or uuencoded data anywhere
    (libarchive's uu filter decodes it, and reads the archive it may hold). Only text that
    is none of these is spared the reading."""
    if _BINARY.search(head) or head.startswith(_TEXT_ARCHIVE_MAGIC):
        return True
    found = data.find(b"begin", start, end)  # the regular expression only where it may match
    return found >= 0 and _UU_START.search(data, found, end) is not None


def strip(message: bytes, findings: list[Finding]) -> bytes | None:
    """The message with every part that holds a finding replaced by a short text part
    saying what was removed and why; None when the finding is the message itself (a
    single-part message, or MIME too complex to take apart): nothing is left to deliver."""
    by_part: dict[int, list[Finding]] = {}
    for finding in findings:
        if finding.part is None or finding.part.depth == 0:
            return None
        by_part.setdefault(finding.part.start, []).append(finding)
    pieces = []
    position = 0
    for start in sorted(by_part):
        part = by_part[start][0].part
        assert part is not None
        pieces += [message[position:part.start], _notice(part, by_part[start])]
        position = part.end
    pieces.append(message[position:])
    return b"".join(pieces)


def _notice(part: Part, findings: list[Finding]) -> bytes:
    name = printable(part.filename or part.content_type)
    reasons = "\r\n".join(f"  - {f.describe()}" for f in findings[:10])
    return (
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Disposition: inline\r\n\r\n"
        f"SecuMail removed the attachment \"{name}\" from this message: files of this kind\r\n"
        "can run programs on your computer, or hide them from the virus scanner.\r\n"
        f"{reasons}\r\n"
        "If you expected it, ask the sender to share it another way.\r\n"
    ).encode("ascii")
