"""What the console shows of a quarantined message (gateway/preview.py, Quarantine.head):
the Subject's decoding, the preview's choice of part and its HTML stripping, on odd and
hostile input, and the bounds of each read."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest

from gateway.preview import HTML_BYTES, html_text, preview, subject
from secumail.mime import in_charset
from secumail.quarantine import Quarantine, QuarantineRecord
from tests.unit.test_gateway_api import Envelope


@pytest.mark.parametrize(("header", "shown"), [
    (b"Subject: =?utf-8?b?SMOpbGxv?= =?utf-8?q?_w=C3=B6rld?=", "Héllo wörld"),
    (b"subject : =?iso-8859-1*fr?q?caf=E9?= au lait", "café au lait"),  # RFC 2231 language
    (b"Subject: =?idna?b?YWJj?= and =?x-unknown?q?caf=C3=A9?=", "abc and café"),
    (b"Subject: =?utf-8?b?not base64!?= =?utf-8?q?unclosed",  # both kept as written
     "=?utf-8?b?not base64!?= =?utf-8?q?unclosed"),
    (b"Subject: raw \xc3\xa9 and \xff bytes", "raw é and \ufffd bytes"),
    (b"Subject: \xe2\x80\xaeexe.pdf =?utf-8?b?4oCu?=gnp.bat\x1b[2J", "exe.pdf gnp.bat [2J"),
    (b"Subject:\r\n", ""),
])
def test_subjects_are_decoded_into_one_safe_line(header: bytes, shown: str) -> None:
    assert subject(b"From: a@remote.test\r\n" + header + b"\r\n\r\nSubject: body\r\n") == shown


def test_only_the_header_block_is_searched_for_the_subject() -> None:
    assert subject(b"From: a\r\n\r\nSubject: in the body\r\n") == ""
    assert subject(b"From: a\nSubject: bare line feeds\n folded\n\nbody\n") == \
        "bare line feeds folded"
    assert subject(b"X-Pad: " + b"x" * 70_000 + b"\r\nSubject: past 64 KiB\r\n\r\n") == ""


@pytest.mark.parametrize(("charset", "data", "text"), [
    (None, "é".encode(), "é"), ("us-ascii", "é".encode(), "é"),
    ("iso-8859-1", b"\xe9", "é"), ("utf-16", "é".encode("utf-16"), "é"),
    ("idna", b"abc", "abc"), ("no-such-charset", b"abc", "abc"), ("utf-8\0", b"a", "a"),
    ("rot13", b"abc", "abc"), ("base64", b"YWJj", "YWJj"), ("hex", b"61", "61"),
    ("utf-8", b"a\xff", "a\ufffd"),
    ("zlib", zlib.compress(b"\0" * 10_000_000), zlib.compress(b"\0" * 10_000_000).decode(
        "utf-8", "replace")),  # no bomb: the charset is no text encoding, read as UTF-8
])
def test_any_charset_decodes_errors_replaced(charset: str | None, data: bytes, text: str
                                             ) -> None:
    assert in_charset(data, charset) == text


def test_a_character_cut_by_the_limit_is_left_out() -> None:
    assert in_charset("aé".encode()[:2], "utf-8", final=False) == "a"


def test_attachments_are_not_the_preview_and_bare_line_feeds_are_read() -> None:
    message = (b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
               b"Content-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\n"
               b"attached file\n--b\nContent-Type: text/plain; charset=iso-8859-1\n\n"
               b"the body, caf\xe9\n--b--\n")
    shown = preview(message)
    assert (shown.text, shown.source, shown.truncated) == ("the body, café", "text/plain",
                                                           False)


def test_a_message_without_text_says_so() -> None:
    shown = preview(b"Content-Type: image/png\r\n\r\n\x89PNG\r\n")
    assert (shown.text, shown.source, shown.note) == ("", "", "the message has no text part")


@pytest.mark.parametrize("markup", [
    "<" * HTML_BYTES, "<a " * (HTML_BYTES // 3), "<script>" + "</scrip" * 30_000,
    "<!--" * (HTML_BYTES // 4), "<p title='" * 20_000, "&amp;" * (HTML_BYTES // 5),
    "<style>" * 30_000, "</" * (HTML_BYTES // 2),
])
def test_stripping_html_takes_linear_time_on_hostile_markup(markup: str) -> None:
    started = time.perf_counter()
    text = html_text(markup, 4097)
    assert time.perf_counter() - started < 1.0  # a quadratic scan would take minutes
    assert "<" not in text.replace("<" * len(text), "")


@pytest.mark.parametrize(("markup", "text"), [
    ("<p>one</p><p>two</p>", "one\n\ntwo"), ("a < b, c<br>d", "a < b, c\nd"),
    ("<SCRIPT type=x>alert(1)</ScRiPt >shown", "shown"), ("<script/>hidden</script>x", "x"),
    ("<p>never closed <script>alert(1)", "never closed"), ("<style>p{}", ""),
    ("<title>t</title><b>b</b>&nbsp;&lt;i&gt;", "b <i>"), ("x<!-- a > b -->y", "xy"),
    ("<img src=http://tracker.test/p.png alt=pixel>", ""),
])
def test_html_becomes_the_text_a_reader_sees(markup: str, text: str) -> None:
    assert html_text(markup, 4097) == text


def record(ident: str, filter_name: str = "spamd") -> QuarantineRecord:
    return QuarantineRecord(ident, filter_name, "spam", "score", "<>", ())


def test_the_head_stops_at_the_blank_line_even_across_two_chunks(tmp_path: Path) -> None:
    quarantine = Quarantine(str(tmp_path))
    header = b"Subject: s\r\nX-Pad: " + b"x" * (Quarantine.HEAD_CHUNK - 22) + b"\r\n"
    ident = quarantine.store("spamd", Envelope(), header + b"\r\n" + b"body" * 50_000, "spam",
                             "score")
    head = quarantine.head(record(ident))
    assert len(header) == Quarantine.HEAD_CHUNK - 1  # the blank line spans two chunks
    assert len(head) == 2 * Quarantine.HEAD_CHUNK and head.startswith(header + b"\r\n")
    assert quarantine.head(record(ident), limit=100) == header[:100]


def test_the_head_of_a_gone_or_forged_record_is_nothing(tmp_path: Path) -> None:
    quarantine = Quarantine(str(tmp_path))
    ident = quarantine.store("spamd", Envelope(), b"Subject: s\r\n\r\nbody", "spam", "score")
    (tmp_path / "x.eml").write_bytes(b"Subject: outside\r\n\r\n")
    assert quarantine.head(record(ident)) == b"Subject: s\r\n\r\nbody"
    assert quarantine.head(record(ident, "..")) == b""
    assert quarantine.head(record("../x")) == b""
    assert quarantine.head(record(ident, "clamav")) == b""
    quarantine.delete(ident)
    assert quarantine.head(record(ident)) == b""
