"""The whole stack from compose.yaml plus the test overlay, brought up once per session with
pytest-docker. Skips, saying why, where no Docker engine runs; CI installs one
(scripts/install-docker.sh), so there these tests run."""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from email import message_from_string
from email.message import Message
from pathlib import Path

import pytest

from testkit.dnssec import signed_zone, tlsa_3_1_1
from testkit.processes import free_port
from testkit.scanners import TESTFILES, write_signatures
from testkit.tls import write_test_pki

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "secumail-e2e"
CLAMAV_REPLICAS = 3
SPAMD_REPLICAS = 2  # every filter scaled: tracking follows a message across replicas
# The stack as a site runs it, plus the tests' overlay (test_v6.py adds compose.ipv6.yaml).
COMPOSE_FILES = ("compose.yaml", "tests/e2e/compose.test.yaml")
IPV6_FILES = ("compose.yaml", "compose.ipv6.yaml", "tests/e2e/compose.test.yaml")
# The MTA-STS destinations of the test stack (compose.test.yaml), each with its mailbox.
REMOTE_RECEIVERS = ("remote-verified", "remote-selfsigned", "remote-plain")
# What must be healthy before a test may send mail through the stack.
CHAIN_SERVICES = ("postfix", "policy", "dkim", "clamav", "spamd", "clamd", "spamassassin")
MODE_SERVICES = ("postfix", "dkim", "clamav", "spamd")  # what SECUMAIL_FILTER_MODE changes


@pytest.fixture(scope="session", autouse=True)
def own_settings_file() -> None:
    """The admin's secumail.env, made as the README's first step makes it: a fresh clone
    has only secumail.env.example (the admin's own file is never in git)."""
    own = ROOT / "secumail.env"
    if not own.exists():
        shutil.copyfile(ROOT / "secumail.env.example", own)


def compose_command() -> str | None:
    """Compose v2 where the docker CLI has it, else Compose v1."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return "docker compose"
    return "docker-compose" if shutil.which("docker-compose") else None


@pytest.fixture(scope="session")
def e2e_dir() -> Iterator[Path]:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True).returncode != 0
    ):
        pytest.skip("no Docker engine here (bash scripts/install-docker.sh provides one)")
    if compose_command() is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    if not TESTFILES.exists():
        pytest.skip("clamav-testfiles is not installed (bash scripts/install-deps.sh)")
    directory = Path(tempfile.mkdtemp(prefix="secumail-e2e-"))
    write_signatures(directory / "clamav-db")
    (directory / "sink").mkdir()
    # The MTA-STS destinations' certificates and mailboxes (test_outbound_tls.py).
    policy_hosts = sorted(p.name for p in (ROOT / "tests/e2e/mta-sts").iterdir())
    write_test_pki(directory / "tls-test", issued={"mx": ["mx.sts-good.test"],
                                                   "web": policy_hosts},
                   self_signed={"selfsigned": ["mx.sts-selfsigned.test"]})
    for receiver in REMOTE_RECEIVERS:
        (directory / receiver).mkdir()
    write_dane_zone(directory)
    os.chmod(directory, 0o755)
    os.environ["SECUMAIL_E2E_DIR"] = str(directory)
    os.environ["SECUMAIL_SMTP_PUBLISH"] = f"127.0.0.1:{free_port()}"
    os.environ["SECUMAIL_SMTP_PUBLISH6"] = f"[::]:{free_port()}"  # compose.ipv6.yaml
    os.environ["SECUMAIL_GATEWAY_PUBLISH"] = f"127.0.0.1:{free_port()}"
    os.environ["SECUMAIL_PROMETHEUS_PUBLISH"] = f"127.0.0.1:{free_port()}"
    # Greylisting in Redis, as scaled set-ups run it; Prometheus scraping the gateway;
    # replicas as a setting (README: it persists across later `up -d`).
    os.environ["COMPOSE_PROFILES"] = "redis,prometheus"
    os.environ["SECUMAIL_CLAMAV_REPLICAS"] = str(CLAMAV_REPLICAS)
    os.environ["SECUMAIL_SPAMD_REPLICAS"] = str(SPAMD_REPLICAS)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def write_dane_zone(directory: Path) -> None:
    """The signed zone dane.test and its trust anchor, for the tests' validating resolver:
    each domain's MX has TLSA records (DANE-EE, its key's SHA-256), right or wrong."""
    tls = directory / "tls-test"
    right = tlsa_3_1_1((tls / "mx.pem").read_bytes())  # remote-verified's key
    wrong = tlsa_3_1_1((tls / "selfsigned.pem").read_bytes())  # another key
    records = []
    for name, address, tlsa in (("good", "172.29.126.61", right),
                                ("wrongkey", "172.29.126.61", wrong),
                                ("stripped", "172.29.126.63", right)):
        records += [f"{name} 300 IN MX 10 mx.{name}", f"mx.{name} 300 IN A {address}",
                    f"_25._tcp.mx.{name} 300 IN TLSA {tlsa}"]
    zone, anchor = signed_zone("dane.test", records)
    (directory / "unbound").mkdir()
    for name, text in (("dane.test.zone", zone), ("dane.test.ds", anchor)):
        (directory / "unbound" / name).write_text(text)
        (directory / "unbound" / name).chmod(0o644)


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return compose_command() or "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> list[str]:
    return [str(ROOT / name) for name in COMPOSE_FILES]


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return PROJECT


@pytest.fixture(scope="session")
def docker_setup(e2e_dir: Path) -> list[str]:
    # Compose v1 knows no --wait: the stack fixture waits on the healthchecks itself.
    return ["down -v --remove-orphans", "up --build -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --remove-orphans"]


class Stack:
    """The running stack, seen from the host like a user sees it."""

    def __init__(self, directory: Path, command: str) -> None:
        self.directory = directory
        self.command = command
        self.compose = self.compose_command(COMPOSE_FILES)
        host, port = os.environ["SECUMAIL_SMTP_PUBLISH"].rsplit(":", 1)
        self.smtp_host, self.smtp_port = host, int(port)
        self.mode = os.environ.get("SECUMAIL_E2E_FILTER_MODE", "before-queue")

    def compose_command(self, files: tuple[str, ...]) -> list[str]:
        return [*self.command.split(), *(a for f in files for a in ("-f", str(ROOT / f))),
                "-p", PROJECT]

    def redeploy(self, files: tuple[str, ...]) -> None:
        """The whole stack again from other compose files (networks made anew)."""
        subprocess.run([*self.compose, "down"], check=True, capture_output=True)
        self.compose = self.compose_command(files)
        subprocess.run([*self.compose, "up", "-d"], check=True, capture_output=True)
        self.wait_healthy(list(CHAIN_SERVICES))

    def switch_mode(self, mode: str) -> None:
        """Run the stack in the other filter mode: the services it concerns are made anew
        (compose recreates a container whose settings changed); queue and mail stay."""
        os.environ["SECUMAIL_E2E_FILTER_MODE"] = mode
        self.recreate(MODE_SERVICES)
        self.mode = mode

    def recreate(self, services: tuple[str, ...]) -> None:
        """`up -d` for these services after a setting changed, as an admin applies one."""
        subprocess.run([*self.compose, "up", "-d", "--no-deps", *services],
                       check=True, capture_output=True)
        self.wait_healthy(list(services))

    def containers(self, service: str) -> list[str]:
        result = subprocess.run(
            [
                "docker",
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.split()

    def inspect(self, container: str) -> dict:  # type: ignore[type-arg]
        result = subprocess.run(["docker", "inspect", container], capture_output=True, text=True)
        return json.loads(result.stdout)[0] if result.returncode == 0 else {}

    def health(self, service: str) -> list[str]:
        return [
            self.inspect(c).get("State", {}).get("Health", {}).get("Status", "none")
            for c in self.containers(service)
        ]

    def wait_healthy(self, services: list[str], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {s: self.health(s) for s in services}
            if all(v and all(h == "healthy" for h in v) for v in states.values()):
                return
            time.sleep(2)
        raise AssertionError(f"not healthy after {timeout}s: {states}\n{self.logs()[-5000:]}")

    def logs(self, service: str = "") -> str:
        result = subprocess.run(
            [*self.compose, "logs", "--no-color", *([service] if service else [])],
            capture_output=True,
            text=True,
        )
        return result.stdout + result.stderr

    def exec(self, service: str, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose, "exec", "-T", service, *command], capture_output=True, text=True
        )

    def mailbox(self, user: str, domain: str = "secumail.test") -> list[Message]:
        """The messages delivered to user@domain's Maildir, read inside the container."""
        script = (
            "import glob, json; print(json.dumps([open(f, errors='replace').read() for f in "
            f"sorted(glob.glob('/var/mail/vhosts/{domain}/{user}/new/*'))]))"
        )
        result = self.exec("postfix", "python3", "-c", script)
        assert result.returncode == 0, result.stderr
        return [message_from_string(text) for text in json.loads(result.stdout)]

    def headers(self, user: str, domain: str = "secumail.test") -> list[Message]:
        """Only the headers of user@domain's messages (cheap enough for thousands)."""
        script = (
            "import glob, json\n"
            "def head(f):\n"
            "    with open(f, errors='replace') as h:\n"
            "        return h.read(16384).split('\\n\\n', 1)[0]\n"
            f"files = glob.glob('/var/mail/vhosts/{domain}/{user}/new/*')\n"
            "print(json.dumps([head(f) for f in files]))"
        )
        result = self.exec("postfix", "python3", "-c", script)
        assert result.returncode == 0, result.stderr
        return [message_from_string(text + "\n\n") for text in json.loads(result.stdout)]

    def wait_for_mail(self, user: str, count: int, timeout: float = 60) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(messages := self.mailbox(user)) < count:
            if time.monotonic() > deadline:
                log = self.logs("postfix")[-4000:]
                raise AssertionError(f"{len(messages)} of {count} messages for {user}\n{log}")
            time.sleep(1)
        return messages

    def sink(self) -> list[Message]:
        """What the stack relayed to foreign domains (aiosmtpd's Maildir in the sink)."""
        path = self.directory / "sink" / "mbox"
        return list(mailbox.Maildir(str(path), create=False)) if path.exists() else []


@pytest.fixture(scope="session")
def stack(e2e_dir: Path, docker_services: object, docker_compose_command: str) -> Stack:
    running = Stack(e2e_dir, docker_compose_command)
    running.wait_healthy(list(CHAIN_SERVICES))
    return running
