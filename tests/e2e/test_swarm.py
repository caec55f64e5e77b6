"""SecuMail on a single-node Docker Swarm, deployed with the README's own commands (its
"Cluster (Docker Swarm)" section, run as written): mail from a test host in a network
namespace of its own goes through the whole chain and is seen with its own address, and a
scaled stack loses and doubles nothing while a clamav task is killed and spamd is updated.

The compose suite's stack may be running meanwhile: this one has its own ports, subnets and
DNS server (on the host's end of docker_gwbridge), and a swarm this session started is left
again at its end (swarm_node). Needs root (a network namespace, and DNS on port 53 for
Postfix)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.dnsserver import LoopbackDNS
from testkit.processes import free_port
from testkit.scanners import TESTFILES, write_signatures
from tests.e2e.conftest import ROOT
from tests.e2e.readme import README, SWARM_BLOCK, Step, blocks, run_blocks

STACK = "secumail"  # the README's name
SERVICES = ("clamav", "clamd", "dkim", "gateway", "policy", "postfix", "redis", "spamassassin",
            "spamd")
OVERLAY = "tests/e2e/compose.swarm.yaml"
# Subnets of its own: the compose suite's networks hold the defaults.
SUBNETS = {"SECUMAIL_EDGE_SUBNET": "172.30.124.0/24", "SECUMAIL_MAIL_SUBNET": "172.30.126.0/24",
           "SECUMAIL_FILTER_SUBNET": "172.30.125.0/24",
           "SECUMAIL_SCANNERS_SUBNET": "172.30.127.0/24"}
# The test host: its own namespace, linked to the host by a veth pair.
NAMESPACE, HOST_SIDE, CLIENT_SIDE = "secumail-client", "sm-host0", "sm-client0"
HOST_IP, CLIENT_IP = "198.51.100.1", "198.51.100.2"
TOKEN = "swarm-admin-token-0123456789"
MESSAGES = int(os.environ.get("SECUMAIL_SWARM_MESSAGES", "1000"))
SESSIONS = 20


def run(*command: str, check: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert not check or result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result


def swarm_state() -> str:
    return run("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()


def gateway_bridge() -> str:
    """`docker network inspect docker_gwbridge`. The engine makes that network a moment
    after `docker swarm init` returns, the first time this machine joins a swarm (seen in
    CI on a new machine: not found yet)."""
    deadline = time.monotonic() + 60
    while (found := run("docker", "network", "inspect", "docker_gwbridge", check=False)
           ).returncode != 0:
        assert time.monotonic() < deadline, f"no docker_gwbridge after 60 s: {found.stderr}"
        time.sleep(0.5)
    return found.stdout


def tasks(service: str, ended_too: bool = False) -> list[str]:
    """The running containers of one of the stack's services (or every one it had)."""
    return run("docker", "ps", "-aq" if ended_too else "-q", "--filter",
               f"label=com.docker.swarm.service.name={STACK}_{service}").stdout.split()


def stack_containers(running_only: bool = False) -> list[str]:
    return run("docker", "ps", "-q" if running_only else "-aq", "--filter",
               f"label=com.docker.stack.namespace={STACK}").stdout.split()


def remove_stack() -> None:
    """What `docker stack rm` leaves: containers going away, then the volumes."""
    run("docker", "stack", "rm", STACK, check=False)
    deadline = time.monotonic() + 120
    while (stack_containers() or run("docker", "network", "ls", "-q", "--filter",
                                     f"label=com.docker.stack.namespace={STACK}").stdout.split()):
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    volumes = run("docker", "volume", "ls", "-q", "--filter",
                  f"label=com.docker.stack.namespace={STACK}").stdout.split()
    if volumes:
        run("docker", "volume", "rm", "-f", *volumes, check=False)
    for secret in ("secumail_admin_token", "secumail_metrics_token", "secumail_redis_password"):
        run("docker", "secret", "rm", secret, check=False)


def make_client_host() -> None:
    remove_client_host()
    run("ip", "netns", "add", NAMESPACE)
    run("ip", "link", "add", HOST_SIDE, "type", "veth", "peer", "name", CLIENT_SIDE)
    run("ip", "link", "set", CLIENT_SIDE, "netns", NAMESPACE)
    run("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_SIDE)
    run("ip", "link", "set", HOST_SIDE, "up")
    inside = ("ip", "netns", "exec", NAMESPACE)
    run(*inside, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", CLIENT_SIDE)
    run(*inside, "ip", "link", "set", CLIENT_SIDE, "up")
    run(*inside, "ip", "link", "set", "lo", "up")
    run(*inside, "ip", "route", "add", "default", "via", HOST_IP)


def remove_client_host() -> None:
    run("ip", "link", "del", HOST_SIDE, check=False)
    run("ip", "netns", "del", NAMESPACE, check=False)


def client_dns(host: str) -> LoopbackDNS:
    """mail.remote.test, the test host, with forward-confirmed reverse DNS and SPF: a
    sender selective greylisting lets through at once."""
    dns = LoopbackDNS(host, 53)
    for name, qtype, value in [
        ("mail.remote.test", "A", CLIENT_IP), ("remote.test", "A", CLIENT_IP),
        ("remote.test", "MX", "10 mail.remote.test."),
        ("remote.test", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
        ("2.100.51.198.in-addr.arpa", "PTR", "mail.remote.test."),
    ]:
        dns.add(name, qtype, value)
    return dns.start()


def block_with(swarm_blocks: list[list[Step]], command: str) -> list[Step]:
    """The README's block with a command that contains `command`."""
    [block] = [b for b in swarm_blocks if any(command in step.command for step in b)]
    return block


@dataclass
class Swarm:
    env: dict[str, str]
    smtp_port: int
    gateway_port: int
    blocks: list[list[Step]]  # the README's swarm blocks
    rewrite: Callable[[str], str]  # a README command as this test runs it

    def run_block(self, command: str, ours: dict[str, str] | None = None) -> None:
        run_blocks([block_with(self.blocks, command)], {"TOKEN": TOKEN, **(ours or {})},
                   ROOT, self.rewrite, self.env)

    def postfix(self) -> str:
        [container] = tasks("postfix")
        return container

    def subjects(self, user: str, prefix: str) -> Counter[str]:
        """How many times each message whose subject starts with prefix reached user."""
        script = (f"grep -h '^Subject: {prefix}' /var/mail/vhosts/secumail.test/{user}/new/* "
                  "2>/dev/null || true")
        result = run("docker", "exec", self.postfix(), "sh", "-c", script)
        return Counter(line.removeprefix("Subject: ") for line in result.stdout.splitlines())

    def message(self, user: str, subject: str) -> str:
        script = (f"grep -l '^Subject: {subject}$' /var/mail/vhosts/secumail.test/{user}/new/* "
                  "| head -1 | xargs cat")
        return run("docker", "exec", self.postfix(), "sh", "-c", script).stdout

    def logs(self, service: str) -> str:
        logs = [run("docker", "logs", c, check=False) for c in tasks(service, ended_too=True)]
        return "".join(log.stdout + log.stderr for log in logs)

    def story(self, subjects: list[str], tag: str, *services: str) -> str:
        """The log lines about these messages (by Message-ID, then by queue id), for a
        failure to say what happened to them."""
        wanted = {f"{tag}.{subject.split()[-1]}" for subject in subjects}
        lines = {service: self.logs(service).splitlines() for service in services}
        ids = {word.strip(":,") for line in lines["postfix"] for mid in wanted if mid in line
               for word in line.split() if word.rstrip(":").isalnum() and word.isupper()}
        keys = wanted | {i for i in ids if len(i) >= 8}
        return "\n".join(f"{service}: {line}" for service, found in lines.items()
                         for line in found if any(key in line for key in keys))

    def wait_converged(self, timeout: float = 600) -> None:
        """Every service at its replica count, every task's healthcheck passing."""
        deadline = time.monotonic() + timeout
        while True:
            listing = run("docker", "service", "ls", "--filter", f"label=com.docker.stack."
                          f"namespace={STACK}", "--format", "{{.Name}} {{.Replicas}}").stdout
            replicas = dict(line.split(" ", 1) for line in listing.splitlines())
            counts = [r.split(" ")[0].split("/") for r in replicas.values()]
            health = [run("docker", "inspect", "--format", "{{.State.Health.Status}}", c,
                          check=False).stdout.strip() for c in stack_containers(running_only=True)]
            updates = [run("docker", "service", "inspect", "--format",
                           "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", f"{STACK}_{name}",
                           check=False).stdout.strip() for name in SERVICES]
            assert not any(u.startswith("rollback") for u in updates), updates
            if replicas and all(a == b for a, b in counts) and \
                    all(h == "healthy" for h in health) and \
                    all(u in ("", "completed") for u in updates):
                return
            assert time.monotonic() < deadline, f"not converged: {replicas} {health} {updates}"
            time.sleep(3)


def send(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    """swaks from the test host's namespace."""
    return run("ip", "netns", "exec", NAMESPACE, "swaks", "--server", server, *args,
               check=False)


@pytest.fixture(scope="session")
def swarm_node() -> Iterator[bool]:
    """Whether this session makes the machine a swarm node (the README's `docker swarm
    init`, run by `swarm`); if so it leaves the swarm again at the session's end, when no
    test needs the compose suite's stack any more (only its `down` is left): on Docker
    20.10, `docker swarm leave` takes Docker's name resolution from the containers already
    running on bridge networks."""
    started = shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0 and swarm_state() != "active"
    yield started
    if started and swarm_state() == "active":
        run("docker", "swarm", "leave", "--force", check=False)


@pytest.fixture(scope="module")
def swarm(swarm_node: bool) -> Iterator[Swarm]:
    if shutil.which("docker") is None or \
            subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine here (bash scripts/install-docker.sh provides one)")
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace for the test host, DNS on port 53")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the README's commands need Compose v2 (scripts/install-docker.sh)")
    if not TESTFILES.exists() or shutil.which("swaks") is None:
        pytest.skip("clamav-testfiles and swaks are needed (bash scripts/install-deps.sh)")
    directory = Path(tempfile.mkdtemp(prefix="secumail-swarm-"))
    write_signatures(directory / "clamav-db")
    for path in (directory, *directory.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    smtp_port, gateway_port = free_port(), free_port()
    env = dict(os.environ)
    # The compose suite's own settings (its ports, replicas, profiles) are not the stack's.
    for name in ("COMPOSE_PROFILES", "COMPOSE_FILE", "SECUMAIL_CLAMAV_REPLICAS",
                 "SECUMAIL_SPAMD_REPLICAS", "SECUMAIL_DKIM_REPLICAS"):
        env.pop(name, None)
    env.update(SUBNETS, SECUMAIL_SMTP_PUBLISH=str(smtp_port),
               SECUMAIL_GATEWAY_PUBLISH=str(gateway_port), SECUMAIL_E2E_DIR=str(directory))
    started_swarm = swarm_node and swarm_state() != "active"
    if swarm_state() == "active":
        remove_stack()  # what an earlier run left
    swarm_blocks = blocks(README.read_text(), SWARM_BLOCK)
    first = block_with(swarm_blocks, "docker swarm init")

    def rewrite(command: str) -> str:
        if command.startswith("docker swarm init") and not started_swarm:
            return "true"  # this machine is in a swarm already
        return command.replace("python3 -m secumail.stack",
                               f"python3 -m secumail.stack -f compose.yaml -f {OVERLAY}")

    ours = {"TOKEN": TOKEN}
    dns = None
    try:
        variables = run_blocks([first[:2]], ours, ROOT, rewrite, env)  # init, labels
        gwbridge = json.loads(gateway_bridge())
        bridge_ip = gwbridge[0]["IPAM"]["Config"][0]["Gateway"]
        dns = client_dns(bridge_ip)
        env["SECUMAIL_SWARM_DNS"] = bridge_ip
        run_blocks([first[2:]], ours, ROOT, rewrite, env, variables)  # build, secrets, deploy
        running = Swarm(env, smtp_port, gateway_port, swarm_blocks, rewrite)
        running.wait_converged()
        running.run_block("docker service scale")  # service ls, scale
        running.wait_converged()
        make_client_host()
        yield running
    finally:
        if not os.environ.get("SECUMAIL_SWARM_KEEP"):  # set, a failure can be looked into
            remove_client_host()
            try:
                run_blocks([block_with(swarm_blocks, "docker stack rm")], ours, ROOT, rewrite,
                           env)
            finally:
                remove_stack()
                if dns is not None:
                    dns.stop()
                (ROOT / "secumail-stack.yaml").unlink(missing_ok=True)
                shutil.rmtree(directory, ignore_errors=True)


def deliver(swarm: Swarm, subject: str) -> str:
    """Send one message from the test host to alice; its header block once delivered."""
    server = f"{HOST_IP}:{swarm.smtp_port}"
    deadline = time.monotonic() + 120
    while True:  # a 4xx while a next hop settles is what a client retries
        sent = send(server, "--helo", "mail.remote.test", "--from", "carol@remote.test",
                    "--to", "alice@secumail.test", "--header", f"Subject: {subject}")
        if "250 2.0.0 Ok: queued as" in sent.stdout or time.monotonic() > deadline:
            break
        assert "<** 5" not in sent.stdout, sent.stdout
        time.sleep(3)
    assert "250 2.0.0 Ok: queued as" in sent.stdout, sent.stdout[-2000:]
    deadline = time.monotonic() + 60
    while not (text := swarm.message("alice", subject)) and time.monotonic() < deadline:
        time.sleep(1)
    return text.split("\n\n", 1)[0]


def test_mail_goes_through_every_hop_and_keeps_the_clients_own_address(swarm: Swarm) -> None:
    headers = deliver(swarm, f"swarm-{uuid.uuid4().hex[:8]}")
    # Every filter's header, and the client as the test host itself, not a Docker address.
    assert f"Received: from mail.remote.test (mail.remote.test [{CLIENT_IP}])" in headers
    assert "X-AV-Checked: ClamAV using SecuMail" in headers
    assert "X-Spam-Status: No" in headers
    assert "X-Greylist: not delayed by SecuMail" in headers
    assert f"Received-SPF: pass (mx.secumail.test: domain of remote.test designates " \
           f"{CLIENT_IP} as permitted sender)" in headers
    assert "Authentication-Results: mx.secumail.test;" in headers
    assert f"client={CLIENT_IP} helo=mail.remote.test sender=carol@remote.test" \
        in swarm.logs("policy")
    # The gateway (its token a Docker secret) tracks it, with the same address.
    deadline = time.monotonic() + 30
    while True:
        found = run("curl", "-sf", "-H", f"Authorization: Bearer {TOKEN}",
                    f"http://127.0.0.1:{swarm.gateway_port}/admin/tracking"
                    f"?sender=carol@remote.test", check=False).stdout
        messages = json.loads(found)["messages"] if found else []
        if any(m["outcome"] == "delivered" for m in messages) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert [m["client"] for m in messages if m["outcome"] == "delivered"] == [CLIENT_IP]
    assert run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
               f"http://127.0.0.1:{swarm.gateway_port}/admin/tracking",
               check=False).stdout == "401"


def test_nothing_lost_or_doubled_while_a_task_is_killed_and_spamd_updates(
        swarm: Swarm) -> None:
    assert len(tasks("clamav")) == 3 and len(tasks("spamd")) == 2  # the README's scale
    tag = f"bulk-{uuid.uuid4().hex[:8]}"
    old_spamd = set(tasks("spamd"))
    bulk = subprocess.Popen(
        ["ip", "netns", "exec", NAMESPACE, str(ROOT / ".venv/bin/python"), "-m",
         "tests.e2e.bulk_send", tag, "--server", f"{HOST_IP}:{swarm.smtp_port}",
         "--count", str(MESSAGES), "--sessions", str(SESSIONS)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    time.sleep(15)
    killed = tasks("clamav")[0]
    run("docker", "kill", killed)
    time.sleep(10)
    updating = threading.Thread(target=swarm.run_block, args=("docker service update",))
    updating.start()
    out, err = bulk.communicate(timeout=1800)
    sent_in = time.monotonic() - started
    updating.join(timeout=600)
    assert bulk.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["permanent"] == []
    assert sorted(result["accepted"]) == list(range(MESSAGES))
    deadline = time.monotonic() + 300
    while sum((arrived := swarm.subjects("dave", tag + " ")).values()) < MESSAGES \
            and time.monotonic() < deadline:
        time.sleep(3)
    lost = MESSAGES - len(arrived)
    doubled = sorted(int(subject.split()[-1]) for subject, n in arrived.items() if n > 1)
    # A task killed between its next hop's 250 and its own client's (RFC 1047): the filter
    # that saw it recorded the message, and its client's retry was answered 250 without
    # being delivered again (secumail/lostacks.py).
    prevented = sum(swarm.logs(service).count("verdict=duplicate")
                    for service in ("clamav", "spamd"))
    print(f"\nswarm: {MESSAGES} messages at {SESSIONS} sessions in {sent_in:.0f} s "
          f"({MESSAGES / sent_in:.1f} msg/s), temporary refusals {dict(result['temporary'])}, "
          f"lost {lost}, doubled {len(doubled)}, retries of a delivered message answered "
          f"without delivering them again {prevented}")
    assert lost == 0
    assert doubled == [], swarm.story(
        [f"{tag} {n}" for n in doubled], tag, "postfix", "clamav", "spamd")
    assert killed not in tasks("clamav")
    assert not old_spamd & set(tasks("spamd"))  # every spamd task was replaced
    swarm.wait_converged(timeout=120)


def test_the_stack_redeployed_from_a_registry_as_on_several_nodes(
        swarm: Swarm, tmp_path: Path) -> None:
    """The README's registry block against a registry of Debian's docker-registry: every
    image pushed, the running stack redeployed with images by registry digest (each service
    updated one task at a time), and mail still goes through."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (bash scripts/install-deps.sh)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{tmp_path / 'store'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = (tmp_path / "registry.log").open("wb")  # a pipe no one reads would stop it
    registry = subprocess.Popen(["docker-registry", "serve", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while run("curl", "-sf", f"http://127.0.0.1:{port}/v2/", check=False).returncode:
            assert time.monotonic() < deadline and registry.poll() is None, "no registry"
            time.sleep(0.5)
        swarm.run_block("REGISTRY=", {"REGISTRY": f"127.0.0.1:{port}"})
        images = {name: run("docker", "service", "inspect", "--format",
                            "{{.Spec.TaskTemplate.ContainerSpec.Image}}", f"{STACK}_{name}"
                            ).stdout.strip() for name in SERVICES}
        assert all(image.startswith(f"127.0.0.1:{port}/secumail/") and "@sha256:" in image
                   for image in images.values()), images
        swarm.wait_converged()
        headers = deliver(swarm, f"registry-{uuid.uuid4().hex[:8]}")
        assert "X-AV-Checked: ClamAV using SecuMail" in headers, headers
        assert "X-Spam-Status: No" in headers
    finally:
        registry.terminate()
        registry.wait(timeout=30)
        log.close()
