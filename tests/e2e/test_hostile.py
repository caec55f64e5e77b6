"""Who may do what, and what hostile input gets, on the running stack (issue: proof)."""

from __future__ import annotations

import itertools
import json
import re
import smtplib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_stack import BOT_HELO, attempt, session

# --- Who may relay ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "sender", "recipient", "expected"),
    [
        ("203.0.113.20", "alice@remote.test", "carol@elsewhere.test", b"Relay access denied"),
        ("203.0.113.21", "bob@secumail.test", "carol@elsewhere.test", b"Sender address forged"),
        ("203.0.113.22", "bob@secumail.test", "dave@secumail.test", b"Sender address forged"),
        (
            "203.0.113.23",
            "alice@remote.test",
            "carol%elsewhere.test@secumail.test",
            b"Relay access denied",
        ),
        (
            "203.0.113.24",
            "alice@remote.test",
            "@secumail.test:carol@elsewhere.test",
            b"Bad recipient address syntax",
        ),
        (
            "203.0.113.25",
            "alice@remote.test",
            '"carol@elsewhere.test"@secumail.test',
            b"Relay access denied",
        ),
        ("203.0.113.26", "alice@remote.test", "carol@[IPv6:2001:db8::25]", b"Relay access denied"),
        ("203.0.113.27", "alice@remote.test", "carol@[198.51.100.25]", b"Relay access denied"),
    ],
)
def test_relay_matrix_from_outside(
    stack: Stack, client: str, sender: str, recipient: str, expected: bytes
) -> None:
    code, reply = attempt(stack, client, sender, recipient)
    assert 500 <= code < 600 and expected in reply, (code, reply)


def test_mynetworks_relays_and_outsiders_cannot_use_its_address(stack: Stack) -> None:
    code, _ = attempt(stack, "127.0.0.20", "bob@secumail.test", "carol@elsewhere.test")
    assert code == 250
    # XCLIENT is for the test client only: another host asking for it is refused.
    with smtplib.SMTP(stack.smtp_host, stack.smtp_port, timeout=30) as smtp:
        smtp.ehlo("test-client.secumail.test")
        assert smtp.docmd("XCLIENT", "ADDR=127.0.0.21")[0] == 220
        smtp.ehlo("mail.remote.test")
        assert smtp.docmd("XCLIENT", "ADDR=127.0.0.22")[0] == 550  # no longer the test client


# --- SMTP smuggling on port 25 -------------------------------------------------------------


@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR"],
)
def test_smuggled_end_of_data_never_makes_a_second_message(stack: Stack, ending: bytes) -> None:
    """From the internet (mynetworks is exempt from Postfix's bare-newline check)."""
    client, marker = "203.0.113.40", uuid.uuid4().hex[:10]
    sender = f"alice.{marker}@remote.test"
    assert attempt(stack, client, sender, "dave@secumail.test", helo=BOT_HELO)[0] == 450
    time.sleep(3)
    payload = (
        b"EHLO test-client.secumail.test\r\nXCLIENT ADDR=" + client.encode() + b"\r\n"
        b"EHLO mail.remote.test\r\nMAIL FROM:<" + sender.encode() + b">\r\n"
        b"RCPT TO:<dave@secumail.test>\r\nDATA\r\n"
        b"Subject: first "
        + marker.encode()
        + b"\r\n\r\nbody"
        + ending
        + b"MAIL FROM:<ceo-"
        + marker.encode()
        + b"@bank.test>\r\nRCPT TO:<dave@secumail.test>\r\n"
        b"DATA\r\nSubject: smuggled " + marker.encode() + b"\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
    )
    with socket.create_connection((stack.smtp_host, stack.smtp_port), timeout=30) as sock:
        sock.sendall(payload)
        answers = b""
        while chunk := sock.recv(65536):
            answers += chunk
    time.sleep(3)
    subjects = [m["Subject"] or "" for m in stack.mailbox("dave") if marker in (m["Subject"] or "")]
    assert not any("smuggled" in s for s in subjects), (subjects, answers)
    assert len(subjects) <= 1
    assert f"from=<ceo-{marker}@bank.test>" not in stack.logs("postfix")


# --- Bad input ------------------------------------------------------------------------------


def test_oversized_mail_is_refused_at_the_first_hop(stack: Stack) -> None:
    sender = f"big.{uuid.uuid4().hex[:10]}@secumail.test"
    big = mail.plain(body=("y" * 998 + "\n") * 10400)  # over 10,240,000 bytes
    with session(stack, "127.0.0.31") as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(sender, ["dave@secumail.test"], big)
        # Without the SIZE hint, Postfix reads it all and still refuses it.
        assert smtp.mail(sender)[0] == 250 and smtp.rcpt("dave@secumail.test")[0] == 250
        code, _ = smtp.data(big)
    assert refused.value.smtp_code == 552 and code == 552
    assert sender not in stack.exec("postfix", "postqueue", "-j").stdout
    # Refusals are logged with from=<...>; only a queued message gets a qmgr line.
    assert not re.search(rf"qmgr\[\d+\]: \w+: from=<{re.escape(sender)}>", stack.logs("postfix"))


@pytest.mark.parametrize("kind", ["long line", "NUL byte", "8-bit header", "broken MIME"])
def test_odd_messages_are_delivered_or_refused_cleanly(stack: Stack, kind: str) -> None:
    marker = uuid.uuid4().hex[:10]
    head = f"From: bob@secumail.test\r\nTo: dave@secumail.test\r\nSubject: odd {marker}\r\n"
    bodies = {
        "long line": head.encode() + b"\r\n" + b"z" * 5000 + b"\r\n",
        "NUL byte": head.encode() + b"\r\nbefore\x00after\r\n",
        "8-bit header": head.encode() + "X-Note: d\u00e9j\u00e0 vu\r\n\r\n8-bit\r\n".encode(),
        "broken MIME": head.encode()
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nno closing boundary\r\n--b2\r\n",
    }
    with session(stack, "127.0.0.32") as smtp:
        code, reply = smtp.mail("bob@secumail.test")
        assert code == 250
        assert smtp.rcpt("dave@secumail.test")[0] == 250
        code, reply = smtp.data(bodies[kind])
    assert code == 250 or 500 <= code < 600, (code, reply)
    if code == 250:
        deadline = time.monotonic() + 60
        while not [m for m in stack.mailbox("dave") if marker in (m["Subject"] or "")]:
            assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
            time.sleep(1)


def test_junk_on_port_25_is_dropped_and_others_still_served(stack: Stack) -> None:
    with socket.create_connection((stack.smtp_host, stack.smtp_port), timeout=30) as sock:
        sock.recv(1000)
        try:
            for _ in range(50):
                sock.sendall(bytes(range(1, 256)) + b"\r\n")
            sock.settimeout(10)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the server hung up on us, as it should
    code, _ = attempt(stack, "127.0.0.33", "bob@secumail.test", "dave@secumail.test")
    assert code == 250


# Each listener as the compose network sees it: (service, port, probe kind, idle connections
# held open, seconds it has to hang up on an offender, rounds of junk). Postfix takes 50
# connections per client (anvil), so 40 idle ones from one; it drops a line that does not
# end after SECUMAIL_SMTPD_TIMEOUT (60 s), the others at once; one round for Postfix, whose
# master never holds a connection's data (each smtpd process ends with its connection).
# Of SecuMail's own services, the first round takes the process to its high-water mark
# (the buffers of 143 connections at once, the allocator's arenas), which varies with timing
# (22 MiB once in CI, 1-3 MiB here); a leak shows as growth round after round.
# A minute to hang up: they do at once (the idle timeout an offender would otherwise get is
# 300 s). Twice in CI some of a round's garbage connections to spamd's filter were open after
# 30 s, then 60 s: those that came while the filter resolved its allowed clients' names got
# no greeting at all (fixed in secumail/access.py; tests/service/test_filters.py).
LISTENERS = [
    ("postfix", 25, "smtp", 40, 75, 1),
    ("policy", 10023, "policy", 100, 60, 4),
    ("clamav", 10025, "smtp", 100, 60, 4),
    ("spamd", 10026, "smtp", 100, 60, 4),
    ("dkim", 10028, "milter", 100, 60, 4),
    ("gateway", 8080, "http", 100, 60, 4),
]


def address(stack: Stack, container: str) -> str:
    """The container's address on a network the gateway shares with it (every one but
    Postfix's edge network)."""
    networks = stack.inspect(container)["NetworkSettings"]["Networks"]
    return str(next(n["IPAddress"] for name, n in networks.items()
                    if not name.endswith("_edge")))


def top(container: str, columns: str) -> list[list[str]]:
    """`docker top CONTAINER axo COLUMNS`, one list per process (the last column may hold
    spaces). Numbers, not names: the host's user names say nothing about a container's."""
    lines = subprocess.run(
        ["docker", "top", container, "axo", columns], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1:]
    return [line.split(None, columns.count(",")) for line in lines]


def rss_kib(container: str, service: str) -> int:
    """Resident memory of the service's own process (Postfix: its master)."""
    wanted = "master" if service == "postfix" else "secumail-"
    return sum(
        int(rss) for _, rss, comm in top(container, "pid,rss,comm") if comm.startswith(wanted)
    )


def junk_round(
    stack: Stack, target: str, port: int, probe: str, idle: int, wait: int
) -> dict[str, object]:
    """One run of junk.py against the target, from the gateway's container: its report."""
    result = subprocess.run(
        [
            "docker",
            "exec",
            "-i",
            stack.containers("gateway")[0],
            "/opt/secumail/bin/python",
            "-",
            address(stack, target),
            str(port),
            probe,
            str(idle),
            str(wait),
        ],
        input=(Path(__file__).parent / "junk.py").read_text(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


@pytest.mark.parametrize(
    ("service", "port", "probe", "idle", "wait", "rounds"),
    LISTENERS,
    ids=[f"{s}:{p}" for s, p, *_ in LISTENERS],
)
def test_junk_on_every_port_is_dropped_and_memory_stays_bounded(
    stack: Stack, service: str, port: int, probe: str, idle: int, wait: int, rounds: int
) -> None:
    """Garbage, endless lines, half-closed requests and idle connections, from inside."""
    target = stack.containers(service)[0]
    rss = [rss_kib(target, service)]
    for _ in range(rounds):
        report = junk_round(stack, target, port, probe, idle, wait)
        expected = {"garbage dropped": 20, "endless lines dropped": 3,
                    "half-closed dropped": 20, "probe with idle connections open": "ok"}
        # On failure, what the service said meanwhile: the report alone did not tell why.
        found = {key: report[key] for key in expected}
        assert found == expected, (report, stack.logs(service)[-8000:])
        time.sleep(2)  # the idle connections just closed
        rss.append(rss_kib(target, service))
    print(f"{service}:{port} junk: {report}; RSS after each round {rss} KiB")
    # The first round's high-water mark: under what reading the endless lines would take.
    assert rss[1] - rss[0] < 40_000, rss
    if rounds > 1:
        # The rounds after it: no leak. A leak grows in every round; a single step of the
        # allocator's high-water mark does not (seen once in CI: the policy service flat
        # for two rounds, then +31 MiB in the fourth), so a step after flat rounds passes.
        growth = [after - before for before, after in itertools.pairwise(rss[1:])]
        assert rss[-1] - rss[1] < 16_000 or min(growth) < 2_000, rss
    # And the service still does its work for everyone else, seen from outside.
    code, _ = attempt(
        stack,
        "127.0.0.34",
        "bob@secumail.test",
        "dave@secumail.test",
        mail.plain(subject=f"after junk on {service}"),
    )
    assert code == 250


# --- Containers -----------------------------------------------------------------------------


def test_every_container_runs_as_a_non_root_user_but_postfix_master(stack: Stack) -> None:
    report = {}
    for service in (
        "postfix",
        "policy",
        "clamav",
        "spamd",
        "clamd",
        "spamassassin",
        "dkim",
        "gateway",
        "redis",
        "prometheus",
    ):
        for container in stack.containers(service):
            rows = {(uid, comm) for _, uid, comm in top(container, "pid,uid,comm")}
            report[f"{service}/{container[:12]}"] = sorted(rows)
    print(report)  # the listing the issue asks for, shown with -s or on failure
    for name, processes in report.items():
        root = {command for uid, command in processes if uid == "0"}
        if name.startswith("postfix/"):
            # master binds port 25; virtual/local switch to the mailbox owner per delivery;
            # postfix-script, the entry point and the init process wait on master.
            allowed = {
                "master",
                "virtual",
                "local",
                "postfix-script",
                "secumail-postfi",
                "docker-init",
            }
            assert root <= allowed, processes
            assert any(uid != "0" for uid, _ in processes), processes
            # The HTTP agent on 9100 (metrics, probe mailbox) runs as the mailboxes' owner.
            assert ("5000", "python3") in processes, processes
        else:
            assert root == set(), (name, processes)


def test_postfix_health_probe_reads_the_smtp_answer_as_nobody(stack: Stack) -> None:
    """Postfix's HEALTHCHECK runs as the container's user, root: the probe caught running
    as root in the listing above (a CI run, 2026-12-07). It drops to nobody before it
    opens its session; here it is run as the HEALTHCHECK runs it, and asked who it is."""
    (container,) = stack.containers("postfix")
    script = ("import os, sys; from secumail import probes; probes.drop_root(); "
              "sys.argv = ['secumail-probe', 'smtp', '127.0.0.1:25']; "
              "print(os.getuid(), os.getgid(), os.getgroups()); probes.main()")
    out = subprocess.run(["docker", "exec", container, "python3", "-c", script],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "65534 65534 []", out
    assert out[1].startswith("220 "), out  # and the probe still works


# Postfix's master alone keeps a few capabilities (compose.yaml's cap_add): their bits.
POSTFIX_CAPABILITIES = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 10))  # CHOWN..


def test_every_container_has_no_capability_and_cannot_gain_one(stack: Stack) -> None:
    """Issue 30: no container dropped capabilities or set no-new-privileges. Read from each
    container's first process: its bounding set (what any process there can ever have) and
    its NoNewPrivs flag (no setuid program raises a process's rights)."""
    report = {}
    for service in ("postfix", "policy", "clamav", "spamd", "clamd", "spamassassin", "dkim",
                    "gateway", "redis", "prometheus"):
        for container in stack.containers(service):
            status = subprocess.run(["docker", "exec", container, "cat", "/proc/1/status"],
                                    capture_output=True, text=True, check=True).stdout
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            report[f"{service}/{container[:12]}"] = (int(fields["CapBnd"], 16),
                                                     fields["NoNewPrivs"].strip())
    print(report)
    for name, (bounding, no_new_privileges) in report.items():
        expected = POSTFIX_CAPABILITIES if name.startswith("postfix/") else 0
        assert (bounding, no_new_privileges) == (expected, "1"), (name, hex(bounding))


# --- Internal ports: only the hosts that hand a service mail reach it (issue 13, item 6) ----

CONNECT = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.settimeout(5)
            print(target, "GREETING", sock.recv(200).decode(errors="replace").strip())
    except OSError as error:
        print(target, "UNREACHABLE", type(error).__name__)
"""


def test_the_scanners_network_reaches_no_filter_and_no_reinjection(stack: Stack) -> None:
    """clamd and spamd parse hostile content: a compromised one must find no SMTP port to
    relay through. From their network (a container on it, as they are), no filter and no
    10027 can even be reached."""
    [clamd] = stack.containers("clamd")
    networks = list(stack.inspect(clamd)["NetworkSettings"]["Networks"])
    [spamassassin] = stack.containers("spamassassin")
    assert list(stack.inspect(spamassassin)["NetworkSettings"]["Networks"]) == networks
    targets = ["clamav:10025", "spamd:10026", "postfix:10027", "postfix:25", "gateway:8080"]
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", networks[0], "--entrypoint", "python3",
         "secumail/policy", "-c", CONNECT, *targets],
        capture_output=True, text=True, timeout=120,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(targets), result.stdout + result.stderr
    assert all(" UNREACHABLE " in line for line in lines), lines


def test_a_filter_refuses_hosts_that_do_not_hand_it_mail(stack: Stack) -> None:
    """Postfix hands mail to the first filter, never to the second: the second one answers
    Postfix's container 554 and hangs up, so nobody skips the ClamAV filter."""
    result = stack.exec("postfix", "python3", "-c", CONNECT, "spamd:10026", "clamav:10025")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("spamd:10026 GREETING 554 5.7.1 "), result.stdout
    assert lines[1].startswith("clamav:10025 GREETING 220 "), result.stdout
    assert "client refused" in stack.logs("spamd")


# --- Secrets go only where they are used (issue 13, item 9) --------------------------------


def test_each_secret_reaches_only_the_containers_that_use_it(stack: Stack) -> None:
    holders: dict[str, set[str]] = {"SECUMAIL_ADMIN_TOKEN": set(),
                                    "SECUMAIL_METRICS_TOKEN": set()}
    for service in ("postfix", "policy", "clamav", "spamd", "clamd", "spamassassin", "dkim",
                    "gateway", "redis", "prometheus"):
        for container in stack.containers(service):
            for variable in stack.inspect(container)["Config"]["Env"]:
                name, _, value = variable.partition("=")
                if name in holders and value:
                    holders[name].add(service)
    assert holders == {"SECUMAIL_ADMIN_TOKEN": {"gateway"},
                       "SECUMAIL_METRICS_TOKEN": {"gateway", "prometheus"}}


def test_redis_requires_the_password_only_its_peers_hold(stack: Stack) -> None:
    refused = stack.exec("redis", "redis-cli", "ping")
    assert "NOAUTH" in refused.stdout + refused.stderr
    script = ("import redis; print(redis.Redis(host='redis', password=open("
              "'/run/secumail/redis/password').read().strip()).ping())")
    assert stack.exec("policy", "python3", "-c", script).stdout.strip() == "True"
    # Not mounted anywhere else: a filter cannot read it.
    assert stack.exec("clamav", "ls", "/run/secumail/redis/password").returncode != 0
