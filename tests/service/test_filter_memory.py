"""A filter's memory for one big message (issue 13, item 11): aiosmtpd kept each DATA line
as an object of its own (about 400 MB for 10 MB of empty lines) and several whole copies
followed. Measured here on the real ClamAV filter, with real clamd and Postfix's smtp-sink as
the next hop: the peak resident memory it adds for one 10 MB message, whatever its lines."""

from __future__ import annotations

import os
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import mail
from testkit.processes import (
    Daemon,
    free_port,
    require_binary,
    service_env,
    start_service,
    wait_for_port,
)
from testkit.scanners import Clamd

SIZE = 10_000_000
HEAD = b"From: alice@secumail.test\r\nTo: bob@secumail.test\r\nSubject: big\r\n\r\n"
BODIES = {
    "empty lines": b"\r\n" * (SIZE // 2),
    "998-byte lines": (b"x" * 998 + b"\r\n") * (SIZE // 1000),
}


def peak_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture
def smtp_sink() -> Iterator[int]:
    """Postfix's smtp-sink: answers 250 to everything and keeps nothing (no memory of ours)."""
    port = free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []  # it will not run as root
    daemon = Daemon([require_binary("smtp-sink"), *user, f"127.0.0.1:{port}", "100"])
    wait_for_port(port)
    yield port
    daemon.stop()


@pytest.mark.parametrize("shape", list(BODIES))
def test_a_big_message_costs_a_small_multiple_of_its_size(
    clamd: Clamd, smtp_sink: int, tmp_path: Path, shape: str
) -> None:
    port = free_port()
    daemon = start_service("secumail-clamav", service_env(
        clamav_listen=f"127.0.0.1:{port}", clamav_next_hop=f"127.0.0.1:{smtp_sink}",
        clamd_address=clamd.address, quarantine_dir=str(tmp_path / "q"),
    ), "SECUMAIL_CLAMAV_LISTEN")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], mail.plain())  # warm
            before = peak_kib(daemon.proc.pid)
            refused = smtp.sendmail("alice@secumail.test", ["bob@secumail.test"],
                                    HEAD + BODIES[shape])
        assert refused == {}
        added = peak_kib(daemon.proc.pid) - before
        print(f"clamav filter, 10 MB of {shape}: peak RSS {before} KiB before, "
              f"+{added} KiB ({added * 1024 / SIZE:.2f}x the message)")
        assert added * 1024 <= 3 * SIZE, (shape, before, added)
    finally:
        daemon.stop()


def test_four_archive_bombs_at_once_stay_small_and_the_next_mail_passes(
    clamd: Clamd, smtp_sink: int, tmp_path: Path
) -> None:
    """Issue 30: four messages of a few hundred bytes (bzip2 streams expanding to 200 MiB
    behind ARJ's magic) took the filter to about 750 MiB. Target: under 300 MiB."""
    bomb = mail.with_part("Content-Type: application/octet-stream\n"
                          "Content-Disposition: attachment; filename=data.bz2",
                          mail.bzip2_bomb())
    port = free_port()
    daemon = start_service("secumail-clamav", service_env(
        clamav_listen=f"127.0.0.1:{port}", clamav_next_hop=f"127.0.0.1:{smtp_sink}",
        clamd_address=clamd.address, quarantine_dir=str(tmp_path / "q"),
    ), "SECUMAIL_CLAMAV_LISTEN")
    answers: list[tuple[int, bytes]] = []

    def send_bomb() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as smtp:
            try:
                smtp.sendmail("alice@secumail.test", ["bob@secumail.test"], bomb)
                answers.append((250, b""))
            except smtplib.SMTPDataError as error:
                answers.append((error.smtp_code, error.smtp_error))

    try:
        senders = [threading.Thread(target=send_bomb) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        peak = peak_kib(daemon.proc.pid)
        print(f"clamav filter, 4 archive bombs at once: peak RSS {peak} KiB; {answers}")
        assert [code for code, _ in answers] == [554] * 4, answers
        assert all(b"archive-bomb" in text for _, text in answers), answers
        assert peak < 300 * 1024, peak
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            assert smtp.sendmail("alice@secumail.test", ["bob@secumail.test"],
                                 mail.plain()) == {}
    finally:
        daemon.stop()
