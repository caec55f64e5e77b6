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
import urllib.request
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run.

    The port is released before the daemon binds it, so the kernel may offer it again:
    remembering what was handed out keeps two daemons of one fixture off the same port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


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
        self.env = env or {}
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.metrics_port = 0  # set for the project's own services

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def logged(self, text: str, timeout: float = 5.0) -> bool:
        """Whether `text` shows up in the output (services flush their logs every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

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


def service_env(**settings: str) -> dict[str, str]:
    """SECUMAIL_* variables for a service under test: loopback, its own metrics port."""
    env = {
        "SECUMAIL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "SECUMAIL_HOSTNAME": "mx.secumail.test",
        "SECUMAIL_DRAIN_TIMEOUT": "5",
        "SECUMAIL_DNS_TIMEOUT": "1",
    }
    env.update({f"SECUMAIL_{k.upper()}": v for k, v in settings.items()})
    return env


def policy_env(port: int, store: str, dns: str = "", **overrides: str) -> dict[str, str]:
    """Greylisting for all (postgrey's semantics) unless a test asks for selective."""
    settings = {"greylist_mode": "all", **overrides}
    return service_env(
        policy_listen=f"127.0.0.1:{port}", greylist_store=store, dns_servers=dns, **settings
    )


def start_service(script: str, env: dict[str, str], listen_variable: str) -> Daemon:
    """Run a console script of the project and wait until its listener answers."""
    daemon = Daemon([str(VENV_BIN / script)], env, name=script)
    port = int(env[listen_variable].rsplit(":", 1)[1])
    try:
        wait_for_port(port)
    except TimeoutError:
        daemon.stop()
        raise AssertionError(f"{script} did not start:\n" + daemon.output()) from None
    daemon.metrics_port = int(env["SECUMAIL_METRICS_LISTEN"].rsplit(":", 1)[1])
    return daemon


def start_policy(env: dict[str, str]) -> Daemon:
    return start_service("secumail-policy", env, "SECUMAIL_POLICY_LISTEN")


def scrape(port: int) -> str:
    """The Prometheus exposition of a service's metrics listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
