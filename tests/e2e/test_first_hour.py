"""An admin's first hour (issue 16): what the README promises about settings, replicas and
the Docker host's own mail, checked on the running stack."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from testkit import mail
from tests.e2e.conftest import (
    CLAMAV_REPLICAS,
    COMPOSE_FILES,
    IPV6_FILES,
    PROJECT,
    ROOT,
    Stack,
)
from tests.e2e.test_stack import attempt

HOST_SERVICES = ("postfix", "policy", "dkim")  # what SECUMAIL_TRUST_DOCKER_HOST changes


def from_the_host(stack: Stack, sender: str, recipient: str, message: bytes
                  ) -> tuple[int, bytes]:
    """A transaction as the Docker host's own cron would make it: no XCLIENT, so Postfix
    sees the address Docker gives the host on a compose network."""
    with smtplib.SMTP(stack.smtp_host, stack.smtp_port, timeout=60) as smtp:
        smtp.ehlo("cron.secumail.test")
        code, reply = smtp.mail(sender)
        if code == 250:
            code, reply = smtp.rcpt(recipient)
        if code == 250:
            code, reply = smtp.data(message)
        return code, reply


def set_trust(stack: Stack, trusted: bool) -> None:
    os.environ["SECUMAIL_E2E_TRUST_DOCKER_HOST"] = "true" if trusted else "false"
    stack.recreate(HOST_SERVICES)


def test_the_docker_hosts_own_mail_is_trusted_only_when_the_admin_says_so(stack: Stack
                                                                          ) -> None:
    subject = f"from the host {uuid.uuid4().hex[:8]}"
    message = mail.plain(subject=subject, sender="cron@secumail.test",
                         to="ops@elsewhere.test")
    code, reply = from_the_host(stack, "cron@secumail.test", "ops@elsewhere.test", message)
    assert code == 554 and b"Sender address forged" in reply, reply
    try:
        set_trust(stack, True)
        trusted = stack.exec("postfix", "postconf", "-h", "mynetworks").stdout.split()
        assert trusted == ["127.0.0.0/8", "[::1]/128", "172.29.124.1/32"]
        code, reply = from_the_host(stack, "cron@secumail.test", "ops@elsewhere.test",
                                    message)
        assert code == 250, reply
        deadline = time.monotonic() + 60
        while not [m for m in stack.sink() if m["Subject"] == subject]:
            assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
            time.sleep(1)
        # Another address of Docker's range (a container, not the host) is no more trusted.
        code, reply = attempt(stack, "172.29.124.77", "cron@secumail.test",
                              "ops@elsewhere.test", message)
        assert code == 554 and b"Sender address forged" in reply, reply
    finally:
        set_trust(stack, False)


def test_replicas_set_in_the_environment_survive_a_later_up(stack: Stack) -> None:
    done = subprocess.run([*stack.compose, "up", "-d"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(stack.containers("clamav")) == CLAMAV_REPLICAS
    stack.wait_healthy(["postfix", "clamav"])


def test_the_postfix_image_answers_postconf_before_its_first_start(stack: Stack) -> None:
    done = subprocess.run(["docker", "run", "--rm", "secumail/postfix", "postconf", "-h",
                           "smtpd_relay_restrictions"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "reject_unauth_destination" in done.stdout


def test_a_subnet_setting_the_network_does_not_have_stops_postfix(stack: Stack) -> None:
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", f"{PROJECT}_filters",
         "-e", "SECUMAIL_FILTER_SUBNET=10.9.0.0/24", "secumail/postfix"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "SECUMAIL_FILTER_SUBNET=10.9.0.0/24, but this container's addresses are" in \
        done.stderr and "172.29.125." in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["docker", "compose"], ["docker-compose"]],
                         ids=["compose-v2", "compose-v1"])
def test_both_composes_read_the_files(command: list[str], tmp_path: Path) -> None:
    """Users run Compose v2; v1 (Debian bookworm's) still reads the same files."""
    if subprocess.run([*command, "version"], capture_output=True).returncode != 0:
        pytest.skip(f"{' '.join(command)} is not installed (scripts/install-docker.sh)")
    # The test overlay's policy service waits on Redis, of the redis profile.
    env = {**os.environ, "SECUMAIL_E2E_DIR": str(tmp_path), "COMPOSE_PROFILES": "redis"}
    env.pop("COMPOSE_FILE", None)
    for files in (["compose.yaml"], list(COMPOSE_FILES), list(IPV6_FILES)):
        done = subprocess.run(
            [*command, *(a for f in files for a in ("-f", str(ROOT / f))), "config", "-q"],
            capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr



def test_a_compose_setting_written_in_secumail_env_stops_postfix(stack: Stack,
                                                                 tmp_path: Path) -> None:
    """The admin of issue 16 set SECUMAIL_FILTER_SUBNET in secumail.env, where compose never
    reads it: Postfix now refuses to start and says where it belongs."""
    env_file = tmp_path / "secumail.env"
    env_file.write_text("SECUMAIL_DOMAINS=example.org\nSECUMAIL_FILTER_SUBNET=10.9.0.0/24\n")
    done = subprocess.run(
        ["docker", "run", "--rm", "-v", f"{env_file}:/etc/secumail/secumail.env:ro",
         "secumail/postfix"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid setting SECUMAIL_FILTER_SUBNET in secumail.env: compose reads it from " \
        ".env" in done.stderr, done.stderr


def test_clamd_without_signatures_says_why_every_minute_and_keeps_running(stack: Stack
                                                                         ) -> None:
    """No route to any mirror (the container has no network at all), an empty signature
    folder: clamd's container says why, again and again, in its log and beside its socket
    for the gateway's health, instead of exiting into a silent restart loop."""
    name = f"secumail-e2e-nosignatures-{uuid.uuid4().hex[:8]}"
    mirror = "http://192.0.2.1/clamav"  # TEST-NET: nothing there, and no network anyway
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", "none",
                    "-e", "CLAMAV_RETRY=2", "-e", f"SECUMAIL_CLAMAV_MIRROR={mirror}",
                    "secumail/clamd"], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            said = (logs.stdout + logs.stderr).count("no ClamAV signatures: freshclam could "
                                                   f"not download them from {mirror}")
            if said >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert said >= 2, logs.stdout[-2000:] + logs.stderr[-2000:]
        assert f"signatures from the private mirror {mirror}" in logs.stderr
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} "
                                "{{.RestartCount}}", name], capture_output=True, text=True)
        assert state.stdout.split() == ["true", "0"], state.stdout
        status = subprocess.run(["docker", "exec", name, "cat", "/run/clamav/status"],
                                capture_output=True, text=True)
        assert "SECUMAIL_CLAMAV_MIRROR" in status.stdout, status
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)
