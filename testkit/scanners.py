"""The real scanning daemons, started by the tests on loopback: Debian's clamd and spamd.

clamd gets a small signature database of the tests' own (ClamAV ships none here and cannot
download any): the EICAR string, and the MD5 of clam.exe from Debian's clamav-testfiles,
which ClamAV then finds inside zip, 7z, pdf, ole and base64 mail attachments too.
spamd runs with local tests only (-L), so no DNS lookup leaves the machine.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

from testkit.processes import Daemon, free_port, require_binary

TESTFILES = Path("/usr/share/clamav-testfiles")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def write_signatures(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secumail-test.ndb").write_text(f"Eicar-Test-Signature:0:*:{EICAR.hex()}\n")
    clam = (TESTFILES / "clam.exe").read_bytes()
    digest = hashlib.md5(clam).hexdigest()
    (directory / "secumail-test.hdb").write_text(f"{digest}:{len(clam)}:ClamAV-Test-File\n")


def _wait_for_answer(
    port: int, request: bytes, expected: bytes, daemon: Daemon, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                if expected in sock.recv(200):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    daemon.stop()
    raise AssertionError(f"{daemon.name} did not start:\n{daemon.output()}")


class Clamd:
    def __init__(self, port: int | None = None) -> None:
        self.binary = require_binary("clamd")
        if not TESTFILES.exists():
            import pytest

            pytest.skip("clamav-testfiles is not installed (bash .ci/run installs it)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="secumail-clamd-"))
        write_signatures(self.dir / "db")
        (self.dir / "clamd.conf").write_text(
            f"DatabaseDirectory {self.dir / 'db'}\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\n"
            f"Foreground yes\nLogFile {self.dir / 'clamd.log'}\nStreamMaxLength 25M\n"
        )
        self.daemon: Daemon | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Clamd:
        self.daemon = Daemon([self.binary, "-c", str(self.dir / "clamd.conf")], name="clamd")
        _wait_for_answer(self.port, b"zPING\0", b"PONG", self.daemon, 60)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


class Spamd:
    def __init__(self, learning: bool = False) -> None:
        """`learning`: spamd takes TELL (--allow-tell) into a Bayes database of its own,
        used from the first message of each kind learned (SpamAssassin waits for 200)."""
        self.binary = require_binary("spamd")
        self.port = free_port()
        self.daemon: Daemon | None = None
        self.options: list[str] = []
        if learning:
            site = Path(tempfile.mkdtemp(prefix="secumail-spamd-"))
            for conf in Path("/etc/spamassassin").glob("*"):
                if conf.is_file():
                    (site / conf.name).write_bytes(conf.read_bytes())
            (site / "bayes").mkdir()
            (site / "zz-test-bayes.cf").write_text(
                f"use_bayes 1\nbayes_path {site}/bayes/bayes\nbayes_file_mode 0777\n"
                "bayes_min_spam_num 1\nbayes_min_ham_num 1\nbayes_auto_learn 0\n")
            os.chmod(site / "bayes", 0o777)
            os.chmod(site, 0o755)
            self.options = ["--allow-tell", f"--siteconfigpath={site}"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Spamd:
        user = ["--username=debian-spamd", "--groupname=debian-spamd"] if os.getuid() == 0 else []
        self.daemon = Daemon(
            [
                self.binary,
                "-L",
                "-x",
                f"--listen=127.0.0.1:{self.port}",
                *user,
                "--max-children=2",
                "--min-children=1",
                "--syslog=stderr",
                *self.options,
            ],
            name="spamd",
        )
        _wait_for_answer(self.port, b"PING SPAMC/1.5\r\n\r\n", b"PONG", self.daemon, 60)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
