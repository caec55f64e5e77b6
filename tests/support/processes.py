"""Starting real daemons for the tests: free ports, readiness, logs kept for failures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def require_binary(name: str) -> str:
    """The path of a Debian daemon the test needs; skip with a reason when it is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        pytest.skip(f"{name} is not installed (bash .ci/run installs it)")
    return path


class Daemon:
    """A subprocess with its output in a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "") -> None:
        self.name = name or Path(argv[0]).name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


def policy_env(port: int, store: str, dns: str = "", **overrides: str) -> dict[str, str]:
    env = {
        "SECUMAIL_POLICY_LISTEN": f"127.0.0.1:{port}",
        "SECUMAIL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "SECUMAIL_GREYLIST_STORE": store,
        "SECUMAIL_DNS_SERVERS": dns,
        "SECUMAIL_DNS_TIMEOUT": "1",
        "SECUMAIL_HOSTNAME": "mx.secumail.test",
        "SECUMAIL_DRAIN_TIMEOUT": "5",
    }
    env.update({f"SECUMAIL_{k.upper()}": v for k, v in overrides.items()})
    return env


def start_policy(env: dict[str, str]) -> Daemon:
    daemon = Daemon([str(VENV_BIN / "secumail-policy")], env, name="secumail-policy")
    port = int(env["SECUMAIL_POLICY_LISTEN"].rsplit(":", 1)[1])
    try:
        wait_for_port(port)
    except TimeoutError:
        daemon.stop()
        raise AssertionError("secumail-policy did not start:\n" + daemon.output()) from None
    return daemon
