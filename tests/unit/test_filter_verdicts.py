"""Scanner replies and what the filters decide from them, without sockets."""

from __future__ import annotations

import pytest

from secumail.backend import BackendError
from secumail.limits import CLAMD_CHUNK as CHUNK
from secumail.protocols.clamd import ScanResult, instream_request
from secumail.protocols.clamd import parse_reply as parse_clamd
from secumail.protocols.spamc import SpamResult, build_request
from secumail.protocols.spamc import parse_reply as parse_spamd
from services.clamav.verdict import unscanned_verdict, virus_verdict
from services.spamd.verdict import oversized_verdict, spam_verdict, unchecked_verdict


def test_clamd_replies() -> None:
    assert parse_clamd(b"stream: OK\0") == ScanResult(False)
    assert parse_clamd(b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0") == ScanResult(
        True, "Eicar-Test-Signature.UNOFFICIAL"
    )
    for bad in (b"INSTREAM size limit exceeded. ERROR\0", b"", b"garbage"):
        with pytest.raises(BackendError):
            parse_clamd(bad)


@pytest.mark.parametrize("size", [0, 1, CHUNK, 2 * CHUNK + 5])
def test_clamd_request_frames_the_message_in_chunks(size: int) -> None:
    message = bytes(range(256)) * (size // 256) + b"m" * (size % 256)
    request = instream_request(message)
    assert request.startswith(b"zINSTREAM\0")
    rest, chunks = request[len(b"zINSTREAM\0"):], []
    while (length := int.from_bytes(rest[:4], "big")) > 0:
        chunks.append(rest[4 : 4 + length])
        rest = rest[4 + length :]
    assert rest == b"\0\0\0\0"  # the zero length that ends the stream, and nothing after
    assert b"".join(chunks) == message
    assert all(len(chunk) <= CHUNK for chunk in chunks)


def test_spamd_replies() -> None:
    reply = (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 12\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
        b"GTUBE,NO_RELAYS"
    )
    assert parse_spamd(reply) == SpamResult(1000.0, ("GTUBE", "NO_RELAYS"))
    assert parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.3 / 5.0\r\n\r\n") == SpamResult(
        -0.3, ()
    )
    for bad in (
        b"SPAMD/1.0 76 Bad header line",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\n\r\n",
    ):
        with pytest.raises(BackendError):
            parse_spamd(bad)
    assert build_request(b"hello").endswith(b"Content-length: 5\r\nUser: secumail\r\n\r\nhello")


@pytest.mark.parametrize(
    ("action", "expected"),
    [("reject", "reject"), ("drop", "drop"), ("quarantine", "quarantine"), ("pass", "deliver")],
)
def test_virus_actions(action: str, expected: str) -> None:
    verdict = virus_verdict(ScanResult(True, "Eicar"), action, "mx.test")
    assert verdict.action == expected and verdict.label == "virus"
    if action == "reject":
        assert verdict.reply == "554 5.7.0 Message refused: virus found (Eicar)"
    if action == "pass":
        assert ("X-Virus-Infected", "Eicar") in verdict.headers


def test_clean_mail_gets_the_checked_header_and_forgeries_go() -> None:
    verdict = virus_verdict(ScanResult(False), "reject", "mx.test")
    assert verdict.action == "deliver"
    assert verdict.headers == (("X-AV-Checked", "ClamAV using SecuMail at mx.test"),)
    assert "X-Virus-Infected" in verdict.remove


def test_scanner_down_fails_closed_unless_told() -> None:
    closed = unscanned_verdict("clamd down", False, "mx.test")
    assert (closed.action, closed.reply[:3]) == ("tempfail", "451")
    opened = unscanned_verdict("clamd down", True, "mx.test")
    assert opened.action == "deliver" and opened.label == "unchecked"
    assert unchecked_verdict("spamd down", False).reply.startswith("451 4.7.1")
    assert unchecked_verdict("spamd down", True).headers == (
        ("X-Spam-Status", "unchecked (spam checker unavailable)"),
    )


@pytest.mark.parametrize(
    ("score", "action", "label", "flag"),
    [
        (0.4, "deliver", "ham", "NO"),
        (6.0, "deliver", "spam", "YES"),
        (12.0, "reject", "spam", None),
    ],
)
def test_spam_thresholds(score: float, action: str, label: str, flag: str | None) -> None:
    verdict = spam_verdict(SpamResult(score, ("A", "B")), 5.0, 10.0, "reject", True)
    assert (verdict.action, verdict.label) == (action, label)
    if flag is not None:
        headers = dict(verdict.headers)
        assert headers["X-Spam-Flag"] == flag
        assert headers["X-Spam-Score"] == f"{score:.1f}"
        assert headers["X-Spam-Status"].endswith(f"score={score:.1f} required=5.0 tests=A,B")
    else:
        assert verdict.reply == "554 5.7.1 Message refused as spam (score 12.0)"


def test_spam_quarantine_instead_of_reject() -> None:
    assert spam_verdict(SpamResult(50, ()), 5, 10, "quarantine", False).action == "quarantine"


@pytest.mark.parametrize(("score", "action"), [
    (7.9, "deliver"), (8.0, "quarantine"), (9.9, "quarantine"), (10.0, "reject"),
])
def test_spam_between_the_quarantine_and_reject_scores_is_quarantined(
        score: float, action: str) -> None:
    verdict = spam_verdict(SpamResult(score, ()), 5, 10, "reject", False, quarantine_score=8)
    assert (verdict.action, verdict.label) == (action, "spam")


def test_big_mail_is_delivered_marked_as_skipped() -> None:
    verdict = oversized_verdict(600_000, 512_000)
    assert (verdict.action, verdict.label) == ("deliver", "skipped")
    assert dict(verdict.headers) == {
        "X-Spam-Status": "No, skipped: 600000 bytes, over the 512000 checked"
    }
    assert "X-Spam-Flag" in verdict.remove  # a forged flag does not survive
