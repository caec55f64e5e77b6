"""The attachment rules over real samples (Debian's clamav-testfiles) and samples built
here, and hostile MIME: plain functions, no sockets."""

from __future__ import annotations

import base64
import email
import os
import tracemalloc
from email import policy as email_policy

import pytest

from secumail.mime import decode_body, walk
from services.clamav.archives import HEAD, Budget
from services.clamav.attachments import (
    AttachmentPolicy,
    Finding,
    check,
    content_rule,
    name_rule,
    strip,
)
from services.clamav.verdict import attachment_verdict
from testkit.mail import (
    PROGRAM,
    attaching,
    bzip2_bomb,
    rar4,
    with_attachment,
    with_part,
    zipped,
)

POLICY = AttachmentPolicy.from_lists([], [], max_depth=3, max_expanded=10 * 2**20,
                                     max_parts=1000)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def rules(message: bytes, policy: AttachmentPolicy = POLICY) -> list[str]:
    return [f.describe() for f in check(message, policy)]


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,rule", [
    ("setup.exe", "blocked-extension"), ("SETUP.EXE", "blocked-extension"),
    ("invoice.pdf.exe", "double-extension"), ("Invoice.PDF .scr", "double-extension"),
    ("run.js", "blocked-extension"), ("a.vbs", "blocked-extension"),
    ("link.lnk", "blocked-extension"), ("disk.iso", "blocked-extension"),
    ("evil.exe.", "blocked-extension"), ("evil.exe  ", "blocked-extension"),
    ("invoice\u202efdp.exe", "deceptive-name"), ("report.pdf", None), ("notes.txt", None),
    ("archive.tar.gz", None), ("exe", None), ("photo.jpg.png", None),
])
def test_names(name: str, rule: str | None) -> None:
    assert name_rule(name, POLICY.blocked) == rule


def test_settings_add_and_allow() -> None:
    policy = AttachmentPolicy.from_lists(["docm", ".XLSM"], ["iso", "office-macro"], 3, 1, 10)
    assert name_rule("a.docm", policy.blocked) == "blocked-extension"
    assert name_rule("a.xlsm", policy.blocked) == "blocked-extension"
    assert name_rule("a.iso", policy.blocked) is None
    assert "office-macro" in policy.allowed_rules


@pytest.mark.parametrize("head,rule", [
    (PROGRAM, "executable-content"), (b"\x7fELF\x02\x01", "executable-content"),
    (b"\xcf\xfa\xed\xfe\x07", "executable-content"),
    (b"L\x00\x00\x00\x01\x14\x02\x00\x00", "executable-content"),
    (b"\x00" * 0x8001 + b"CD001\x01", "disk-image"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500 + "_VBA_PROJECT".encode("utf-16-le"),
     "office-macro"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500, None), (PDF, None),
])
def test_content(head: bytes, rule: str | None) -> None:
    assert content_rule(head) == rule


# --- real samples and built ones -----------------------------------------------------------

@pytest.mark.parametrize("sample,found", [
    ("clam.exe", "executable-content: clam.exe"),
    ("clam.zip", "blocked-extension: clam.zip > clam.exe"),
    ("clam.7z", "blocked-extension: clam.7z > clam.exe"),
    ("clam.tar.gz", "blocked-extension: clam.tar.gz > clam.exe"),
    ("clam.cab", "blocked-extension: clam.cab > clam.exe"),
    ("clam.exe.bz2", "executable-content: clam.exe.bz2 > data"),
    ("clam_cache_emax.tgz", "archive-bomb: clam_cache_emax.tgz > clam01.tgz > clam02.tgz > "
                            "clam03.tgz: archives nested deeper than 3"),
])
def test_debian_samples(sample: str, found: str) -> None:
    assert found in rules(with_attachment(sample))


@pytest.mark.parametrize("sample", ["clam.pdf", "clam.ole.doc", "clam.ppt"])
def test_documents_without_programs_pass(sample: str) -> None:
    """ClamAV's test signature is in them (clamd says virus); no attachment rule applies."""
    assert rules(with_attachment(sample)) == []


@pytest.mark.parametrize("archive", [
    zipped([("docs/invoice.pdf.exe", PROGRAM)]),
    zipped([("docs/invoice.pdf.exe", PROGRAM)], "7zip"),
    zipped([("docs/invoice.pdf.exe", PROGRAM)], "ustar"),
    rar4("docs/invoice.pdf.exe", PROGRAM),
], ids=["zip", "7z", "tar", "rar"])
def test_a_double_extension_in_any_archive(archive: bytes) -> None:
    found = rules(attaching([("invoice.zip", archive)]))
    assert found == ["double-extension: invoice.zip > docs/invoice.pdf.exe",
                     "executable-content: invoice.zip > docs/invoice.pdf.exe"]


def test_content_is_judged_not_the_name_or_type() -> None:
    """A program renamed report.pdf, inside an archive renamed photos.jpg."""
    archive = zipped([("report.pdf", PROGRAM)])
    assert rules(attaching([("photos.jpg", archive)])) == [
        "executable-content: photos.jpg > report.pdf"]


@pytest.mark.parametrize("archive", [
    zipped([("invoice.pdf", PDF)], options="zip:encryption=zipcrypt", passphrase="1234"),
    rar4("invoice.pdf", PDF, encrypted=True),
], ids=["zip", "rar"])
def test_encrypted_archives_cannot_be_checked(archive: bytes) -> None:
    [found] = rules(attaching([("invoice.zip", archive)]))
    assert found.startswith("encrypted-archive: invoice.zip")


def test_office_macros_in_ooxml_and_ole() -> None:
    docm = zipped([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w/>"),
                   ("word/vbaProject.bin", b"\xd0\xcf\x11\xe0")])
    docx = zipped([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w/>")])
    ole = (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 70000
           + "_VBA_PROJECT".encode("utf-16-le"))
    assert rules(attaching([("order.docm", docm)])) == ["office-macro: order.docm"]
    assert rules(attaching([("order.doc", ole)])) == ["office-macro: order.doc"]
    assert rules(attaching([("order.docx", docx), ("report.pdf", PDF)])) == []


def test_filenames_encoded_by_rfc_2231_and_2047_and_uuencode() -> None:
    folded = (b"From: a@secumail.test\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
              b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;\r\n"
              b" filename*0*=utf-8''invoice%2Epdf;\r\n filename*1=\".exe\"\r\n\r\nAAAA\r\n"
              b"--b\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Disposition: attachment; filename=\"=?utf-8?B?cnVuLmpz?=\"\r\n\r\n"
              b"x\r\n--b\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
              b"begin 644 tool.scr\r\n#34T`\r\n`\r\nend\r\n--b--\r\n")
    assert rules(folded) == ["double-extension: invoice.pdf.exe", "blocked-extension: run.js",
                             "blocked-extension: tool.scr"]


def test_a_clean_message_passes() -> None:
    assert rules(attaching([("report.pdf", PDF), ("notes.zip", zipped([("a.txt", b"hi")]))])) \
        == []


# --- hostile MIME: bounded time and memory -----------------------------------------------------

def nested(depth: int) -> bytes:
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n)
                    for n in range(depth))
    tail = b"".join(b"\r\n--b%d--" % n for n in reversed(range(depth)))
    return b"From: a@secumail.test\r\n" + head + b"Content-Type: text/plain\r\n\r\nhi" + tail


def within(budget_bytes: int, function, *args):  # type: ignore[no-untyped-def]
    """Run `function`, failing if it allocated more than `budget_bytes` at its peak."""
    tracemalloc.start()
    try:
        result = function(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < budget_bytes, f"peak {peak} bytes"
    return result


def test_deep_nesting_is_refused_without_recursion() -> None:
    assert [p.depth for p in walk(nested(25))] == [25]  # within the limit: walked
    message = nested(5000)
    assert within(20 * len(message), rules, message) == [
        "mime-too-complex: MIME parts nested deeper than 30"]


def test_thousands_of_parts_are_refused_at_the_limit() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(20000))
    message = (b"From: a@secumail.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + parts + b"--b--\r\n")
    assert within(30 * len(message), rules, message) == [
        "mime-too-complex: more than 1000 MIME parts"]


def test_broken_base64_does_not_hide_a_program() -> None:
    encoded = base64.b64encode(PROGRAM * 10)
    spoiled = b"\r\n".join(encoded[i:i + 40] + b"*!~" for i in range(0, len(encoded), 40))
    message = (b"From: a@secumail.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
               b"Content-Disposition: attachment; filename=cat.png\r\n\r\n"
               + spoiled[:-1] + b"\r\n--b--\r\n")
    assert rules(message) == ["executable-content: cat.png"]


def test_archive_bombs() -> None:
    zeros = zipped([("zeros.bin", b"\x00" * (16 * 2**20))])  # 16 MiB in a few KiB
    [found] = within(8 * 2**20, rules, attaching([("bomb.zip", zeros)]))
    assert found.startswith("archive-bomb: bomb.zip")
    many = zipped([(f"f{n}.txt", b"x") for n in range(1500)])
    [found] = rules(attaching([("many.zip", many)]))
    assert found.startswith("archive-bomb: many.zip")
    deep = PROGRAM
    for level in range(5):
        deep = zipped([(f"level{level}.zip" if level else "x.txt", deep)])
    [found] = rules(attaching([("deep.zip", deep)]))
    assert found.startswith("archive-bomb: deep.zip > level4.zip > level3.zip > level2.zip")


def test_a_damaged_archive_is_refused() -> None:
    archive = zipped([("a.txt", b"hello" * 100)])
    [found] = rules(attaching([("a.zip", archive[:40] + b"\xff" * 40 + archive[80:])]))
    assert found.startswith("unreadable-archive: a.zip")


# --- what the filter does with them ----------------------------------------------------------

def test_strip_puts_a_notice_in_the_attachment_s_place() -> None:
    message = attaching([("report.pdf", PDF), ("invoice.zip", rar4("invoice.pdf.exe", PROGRAM))])
    findings = check(message, POLICY)
    stripped = strip(message, findings)
    assert stripped is not None and b"MZ" not in stripped
    parsed = email.message_from_bytes(stripped, policy=email_policy.default)
    parts = list(parsed.iter_parts())
    assert [p.get_filename() for p in parts] == [None, "report.pdf", None]
    notice = parts[2].get_content()
    assert 'removed the attachment "invoice.zip"' in notice
    assert "double-extension: invoice.zip > invoice.pdf.exe" in notice
    assert parts[1].get_content() == PDF  # the rest untouched, byte for byte
    assert check(stripped, POLICY) == []


def test_a_single_part_program_cannot_be_stripped() -> None:
    message = (b"From: a@secumail.test\r\nContent-Type: application/octet-stream; name=a.exe"
               b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(PROGRAM))
    findings = check(message, POLICY)
    assert [f.rule for f in findings] == ["blocked-extension", "executable-content"]
    assert strip(message, findings) is None
    assert attachment_verdict(findings, "strip", "mx", message).action == "quarantine"


def test_verdicts_by_action() -> None:
    message = attaching([("invoice.pdf.exe", PROGRAM)])
    findings = check(message, POLICY)
    reject = attachment_verdict(findings, "reject", "mx", message)
    assert reject.action == "reject" and reject.reply == (
        "554 5.7.1 Message refused: attachment not allowed "
        "(double-extension: invoice.pdf.exe)")
    assert attachment_verdict(findings, "quarantine", "mx", message).action == "quarantine"
    stripped = attachment_verdict(findings, "strip", "mx", message)
    assert stripped.action == "deliver" and stripped.message is not None
    assert ("X-SecuMail-Attachments", "removed: double-extension: invoice.pdf.exe; "
            "executable-content: invoice.pdf.exe") in stripped.headers
    passed = attachment_verdict(findings, "pass", "mx", message)
    assert passed.action == "deliver" and passed.message is None
    assert "X-SecuMail-Attachments" in passed.remove  # a forged one never survives


def test_names_are_made_safe_to_show() -> None:
    finding = Finding("blocked-extension", "a\r\n--b\r\nX: y\u202e.exe", None)
    assert finding.describe() == "blocked-extension: a??--b??X: y\\u202e.exe"


def test_decode_body_limit() -> None:
    message = attaching([("a.bin", b"\x01" * 100000)])
    [_, part] = list(walk(message))
    assert decode_body(message, part, 1000) == b"\x01" * 1000
    assert decode_body(message, part) == b"\x01" * 100000


# --- issue 30: ways around the rules, each one walked through before the fix -------------------

DEFAULTS = AttachmentPolicy.from_lists([], [], max_depth=3, max_expanded=100 * 2**20,
                                       max_parts=1000)
EXE = [("invoice.pdf.exe", PROGRAM)]


def test_a_compressed_stream_is_charged_for_every_byte_it_expands_to() -> None:
    """190 bytes of bzip2 expanding to 200 MiB that start with ARJ's magic: read whole,
    uncharged (about 215 MiB for one message) before; now the budget stops it, and the
    room to hold members bounds the memory."""
    message = with_part("Content-Type: application/octet-stream\n"
                        "Content-Disposition: attachment; filename=data.bz2", bzip2_bomb())
    [found] = within(40 * 2**20, rules, message, DEFAULTS)
    assert found.startswith("archive-bomb: data.bz2 > data: ")


def test_many_parts_share_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part got the budget again: a 1,000-part message was minutes of CPU."""
    bomb = base64.encodebytes(bzip2_bomb(20 * 2**20))
    parts = b"".join(b"--b\r\nContent-Type: application/x-bzip2\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + bomb for _ in range(200))
    message = (b"From: a@secumail.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + parts + b"--b--\r\n")
    charged: list[int] = []
    charge = Budget.charge
    monkeypatch.setattr(Budget, "charge", lambda self, size, where: (
        charged.append(size), charge(self, size, where))[1])
    found = check(message, DEFAULTS)
    assert found[-1].rule == "archive-bomb" and found[-1].part is None  # never stripped
    assert "expands past the limit" in found[-1].path
    assert sum(charged) <= DEFAULTS.max_expanded + 2 * HEAD


def test_the_checking_thread_has_a_cpu_budget() -> None:
    policy = AttachmentPolicy.from_lists([], [], 3, 10 * 2**30, 1000, max_seconds=0.05)
    found = check(attaching([("a.bz2", bzip2_bomb())]), policy)
    assert [f.rule for f in found] == ["archive-bomb"]
    assert "more than 0.05 CPU seconds to check" in found[0].path


@pytest.mark.parametrize("archive", [
    b"junk bytes, then a zip\x00" * 100 + zipped(EXE),
    zipped(EXE, "v7tar"),
    zipped(EXE, "cpio_newc"),
    zipped(EXE, "cpio_odc"),
    zipped(EXE, "ustar", filter_name="zstd"),
    zipped(EXE, "ustar", filter_name="xz"),
], ids=["zip-after-junk", "v7-tar", "cpio-newc", "cpio-odc", "tar.zst", "tar.xz"])
def test_an_archive_is_found_by_libarchive_not_by_its_first_bytes(archive: bytes) -> None:
    """Each carried invoice.pdf.exe through: none started with a magic the filter knew."""
    found = rules(attaching([("invoice.dat", archive)]))
    assert "double-extension: invoice.dat > invoice.pdf.exe" in found


def test_an_archive_declared_as_text_without_a_name_is_looked_into() -> None:
    message = with_part("Content-Type: text/plain", b"junk first\r\n" + zipped(EXE))
    assert rules(message) == ["double-extension: text/plain > invoice.pdf.exe",
                              "executable-content: text/plain > invoice.pdf.exe"]


def test_an_archive_hidden_after_junk_inside_an_archive_is_looked_into() -> None:
    inner = b"junk" * 1000 + zipped(EXE)
    found = rules(attaching([("outer.zip", zipped([("inner.bin", inner)]))]))
    assert "double-extension: outer.zip > inner.bin > invoice.pdf.exe" in found


def test_an_archive_too_big_to_hold_is_refused_not_skipped() -> None:
    policy = AttachmentPolicy.from_lists([], [], 3, 100 * 2**20, 1000, max_member=2**20)
    inner = zipped([("big.bin", os.urandom(2 * 2 ** 20)), *EXE], "zip",
                   options="zip:compression=store")
    [found] = rules(attaching([("outer.zip", zipped([("inner.bin", inner)]))]), policy)
    assert found == "archive-bomb: outer.zip: inner.bin: an archive too big to look into"


def test_a_file_that_only_resembles_an_archive_passes() -> None:
    """Detection is libarchive's: binary that no archive tool opens is not refused."""
    assert rules(attaching([("photo.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40),
                            ("notes.txt", b"PK is not a zip\r\n" * 50)])) == []


@pytest.mark.parametrize("headers", [
    # Unquoted encoded word on a text part: the content check was skipped entirely.
    "Content-Type: text/plain\nContent-Disposition: attachment; "
    "filename==?utf-8?Q?setup=2Eexe?=",
    "Content-Type: application/pdf\nContent-Disposition: attachment; "
    "filename=\"report.pdf\"; filename*=utf-8''setup%2Eexe",
    "Content-Type: application/pdf; name=\"setup.exe\"\n"
    "Content-Disposition: attachment; filename=\"report.pdf\"",
    "Content-Type: application/pdf\nContent-Disposition: attachment; filename=report.pdf\n"
    "Content-Disposition: attachment; filename=setup.exe",
    "Content-Type: application/pdf\nContent-Disposition: attachment; "
    "filename*0=\"set\"; filename*2=\"up.exe\"",
    "Content-Type: application/pdf\nContent-Disposition: attachment; "
    "filename=\"setup.exe\x00.pdf\"",
], ids=["encoded-word-unquoted", "filename-star", "name-beside-filename",
        "two-dispositions", "continuation-gap", "nul"])
def test_every_name_a_part_has_is_checked(headers: str) -> None:
    found = rules(with_part(headers + "\nContent-Transfer-Encoding: 7bit", b"harmless\r\n"))
    assert any(f.startswith("blocked-extension: set") for f in found), found


@pytest.mark.parametrize("header", [
    'Content-Type: application/octet-stream; name="=?idna?B?eG4tLS0tLS0tLS0tLS0tLS0t?=.exe"',
    "Content-Disposition: attachment; filename*=idna''xn--%FF%FE.exe",
    'Content-Type: application/octet-stream; name="=?punycode?Q?=FF=FE?=.exe"',
])
def test_a_name_in_a_charset_that_cannot_replace_is_still_read(header: str) -> None:
    """Python's idna and punycode codecs raise where others replace: such a name made the
    check raise, and the filter answer 451 to the message for ever."""
    message = with_part(header + "\nContent-Transfer-Encoding: 7bit", b"MZ hello")
    assert {f.rule for f in check(message, POLICY)} == {"blocked-extension",
                                                          "executable-content"}


# --- issue 31: text is spared libarchive, and small mail is checked on the event loop --------

TEXT_PROGRAM = [("tool.exe", b"@echo off\r\necho this would run\r\n")]


@pytest.mark.parametrize("archive_format", ["ar_svr4", "ar_bsd"])
def test_an_archive_made_of_text_is_still_read(archive_format: str) -> None:
    """Parts that look like text are not handed to libarchive, but for the archives
    libarchive reads that are text themselves (ar of text files: `!<arch>`, ASCII
    headers), sent as a plain-text part with no name (base64: an 8bit text's line ends
    would be made CRLF on the way, which no ar survives)."""
    archive = zipped(TEXT_PROGRAM, archive_format)
    assert not archive.translate(None, b"\t\r\n\x0c" + bytes(range(32, 127)))  # text only
    message = with_part("Content-Type: text/plain", archive)
    assert "blocked-extension: text/plain > tool.exe" in rules(message)


def test_a_uuencoded_archive_deep_in_a_text_is_still_read() -> None:
    """libarchive's uu filter decodes `begin 644 name` wherever it is; what it holds is an
    archive like any other. After 100 KiB of text, past the head where binary is sought."""
    import binascii
    archive = zipped(EXE)
    lines = b"".join(binascii.b2a_uu(archive[i:i + 45]) for i in range(0, len(archive), 45))
    text = b"Minutes of the meeting.\n" * 4300 + b"begin 644 minutes.dat\n" + lines + b"`\nend\n"
    message = with_part("Content-Type: text/plain\nContent-Transfer-Encoding: 8bit", text)
    found = rules(message)
    assert any(f.startswith("double-extension:") and f.endswith("> invoice.pdf.exe")
               for f in found), found


def test_small_text_mail_is_checked_inline_and_archives_go_to_a_thread() -> None:
    from services.clamav.attachments import NeedsThread
    plain = with_part("Content-Type: text/plain; name=run.js", b"alert(1)")
    assert [f.rule for f in check(plain, POLICY, inline=True)] == ["blocked-extension"]
    archive = attaching([("a.zip", zipped(EXE))])  # an archive to read
    with pytest.raises(NeedsThread):
        check(archive, POLICY, inline=True)
    assert rules(archive) == ["double-extension: a.zip > invoice.pdf.exe",
                              "executable-content: a.zip > invoice.pdf.exe"]
    with pytest.raises(NeedsThread):  # over INLINE_MAX_BYTES, text or not
        check(attaching([("a.txt", b"x" * 300_000)]), POLICY, inline=True)


@pytest.mark.parametrize("block", [
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\nContent-Type: text/plain\r\n\r\n",
    b"content-type: APPLICATION/octet-stream; name*0=\"ev\"; name*1=\"il.exe\"\r\n"
    b"Content-Disposition: attachment; filename=\"=?utf-8?q?a=2Eexe?=\"\r\n\r\n",
    b"Content-Type: text\r\nContent-Transfer-Encoding: BASE64\r\n\r\n",
    b"Subject: no MIME fields at all\r\n\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%80%AEexe.txt\r\n\r\n",
])
def test_headers_read_once_read_as_the_email_package_reads_them(block: bytes) -> None:
    """secumail/mime.py's PartHeaders keeps each field's first parse: every answer the
    attachment check asks for, asked twice, is what a plain EmailMessage gives."""
    from email import policy
    from email.parser import BytesHeaderParser

    from secumail.mime import PartHeaders

    ours = BytesHeaderParser(_class=PartHeaders, policy=policy.default).parsebytes(block)
    plain = BytesHeaderParser(policy=policy.default).parsebytes(block)
    assert isinstance(ours, PartHeaders)
    for _ in range(2):
        assert ours.get_content_type() == plain.get_content_type()
        assert ours.get_param("boundary") == plain.get_param("boundary")
        assert ours.get_filename() == plain.get_filename()
        assert ours.get("content-transfer-encoding", "x") == \
            plain.get("content-transfer-encoding", "x")
        assert ours.get("Content-Type") == plain.get("Content-Type")
        assert list(ours.raw_items()) == list(plain.raw_items())
