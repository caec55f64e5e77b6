"""The Postfix container's supervisor around a real Postfix (Debian's 3.7): its log passed
through and counted, queue sizes, the probe mailbox with a canary Postfix really delivered,
SIGTERM turned into `postfix stop`, and a master that dies on its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.postfix import PostfixInstance
from testkit.processes import Daemon, free_port, service_env, wait_for_port
from testkit.sink import SmtpSink

DRIVER = """
import sys
from pathlib import Path
from secumail.logs import setup_logging
from secumail.settings import load_settings
from services.postfix.supervisor import supervise
setup_logging()
# The agent as this user: the test's virtualenv may lie in a folder the mailboxes' owner
# cannot enter (the e2e suite shows the agent running as vmail in the container).
sys.exit(supervise(load_settings(), sys.argv[1], Path(sys.argv[2]),
                   ("postfix", "-c", sys.argv[3]), drop_agent=False))
"""
NOBODY = 65534
TOKEN = "c0ffee00" * 4  # 32 hex digits, as the gateway makes them


class Supervised:
    def __init__(self, postfix: PostfixInstance, daemon: Daemon, agent: int, base: Path) -> None:
        self.postfix, self.daemon, self.agent, self.base = postfix, daemon, agent, base

    def get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.agent}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}\n{self.daemon.output()[-3000:]}"
            time.sleep(0.1)


@pytest.fixture
def supervised(sink: SmtpSink) -> Iterator[Supervised]:
    base = Path(tempfile.mkdtemp(prefix="secumail-vhosts-"))
    os.chmod(base, 0o755)  # the delivery user must reach it (pytest's tmp_path is 0700)
    os.chown(base, NOBODY, NOBODY)
    postfix = PostfixInstance({
        "maillog_file": "/dev/stdout",
        "maillog_file_prefixes": "/dev/stdout",
        "virtual_mailbox_domains": "secumail.test",
        "virtual_mailbox_base": str(base),
        "virtual_mailbox_maps": "inline:{ probe@secumail.test=secumail.test/probe/ }",
        "virtual_uid_maps": f"static:{NOBODY}",
        "virtual_gid_maps": f"static:{NOBODY}",
        "relay_domains": "elsewhere.test",
        "transport_maps": f"inline:{{ elsewhere.test=smtp:[127.0.0.1]:{sink.port} }}",
        "smtpd_recipient_restrictions": "check_recipient_access "
        "inline:{ hold@elsewhere.test=HOLD }, permit_mynetworks, reject",
    })
    (postfix.root / "queue").mkdir()
    assert postfix.postfix("set-permissions", "create-missing").returncode == 0
    agent = free_port()
    env = service_env(
        metrics_listen=f"127.0.0.1:{agent}",
        probe_mailbox="probe@secumail.test",
        domains="secumail.test",
        # The sink stands in for the content filter: deliveries to it count as via=filter.
        content_filter_address=f"127.0.0.1:{sink.port}",
        request_timeout="1",
    )
    daemon = Daemon(
        [sys.executable, "-c", DRIVER, str(base), str(postfix.root / "queue"),
         str(postfix.config_dir)],
        env, name="secumail-postfix-supervisor",
    )
    try:
        wait_for_port(postfix.port, timeout=20)
        wait_for_port(agent)
    except TimeoutError:
        daemon.stop()
        raise AssertionError(daemon.output()) from None
    yield Supervised(postfix, daemon, agent, base)
    daemon.stop(timeout=20)
    postfix.postfix("stop")  # in case a test left it running
    postfix.stop()
    shutil.rmtree(base, ignore_errors=True)


def send(port: int, recipient: str, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("alice@secumail.test", [recipient], message)


def test_log_is_passed_through_and_counted(supervised: Supervised, sink: SmtpSink) -> None:
    send(supervised.postfix.port, "carol@elsewhere.test", b"Subject: out\r\n\r\nhello\r\n")
    received = ("secumail_postfix_messages_received_total", (("source", "smtp"),))
    sent = ("secumail_postfix_deliveries_total", (("status", "sent"), ("via", "filter")))
    supervised.wait_for(lambda: supervised.metrics().get(sent) == 1, "no delivery counted")
    assert supervised.metrics()[received] == 1
    assert "postfix/smtpd" in supervised.daemon.output()  # Postfix's own lines, unchanged
    assert len(sink.envelopes) == 1


def test_queue_sizes_follow_the_real_queue(supervised: Supervised) -> None:
    hold = ("secumail_postfix_queue_messages", (("queue", "hold"),))
    assert supervised.metrics()[hold] == 0
    assert supervised.metrics()[("secumail_postfix_up", ())] == 1
    send(supervised.postfix.port, "hold@elsewhere.test", b"Subject: held\r\n\r\nwait\r\n")
    supervised.wait_for(lambda: supervised.metrics()[hold] == 1, "no message on hold")
    assert supervised.postfix.postfix("flush").returncode == 0  # a flush leaves hold alone
    assert supervised.metrics()[hold] == 1
    assert supervised.metrics()[("secumail_postfix_queue_messages", (("queue", "deferred"),))] == 0


def test_probe_mailbox_shows_then_removes_a_delivered_canary(supervised: Supervised) -> None:
    assert supervised.get(f"/probe/{TOKEN}")[0] == 404
    canary = f"Subject: canary\r\nX-SecuMail-Probe: {TOKEN}\r\n\r\nchirp\r\n".encode()
    send(supervised.postfix.port, "probe@secumail.test", canary)
    supervised.wait_for(lambda: supervised.get(f"/probe/{TOKEN}")[0] == 200, "no canary")
    found = json.loads(supervised.get(f"/probe/{TOKEN}")[1])
    names = [name for name, _ in found["headers"]]
    assert "Received" in names and ["Subject", "canary"] in found["headers"]
    assert found["delivered_at"] <= time.time()
    assert supervised.get(f"/probe/{TOKEN}", "DELETE")[0] == 204
    assert supervised.get(f"/probe/{TOKEN}")[0] == 404
    assert supervised.get(f"/probe/{TOKEN}", "DELETE")[0] == 404
    assert supervised.get("/probe/../../etc/passwd")[0] == 404
    assert list((supervised.base / "secumail.test/probe/new").iterdir()) == []


def test_sigterm_stops_postfix_cleanly(supervised: Supervised) -> None:
    supervised.daemon.proc.send_signal(signal.SIGTERM)
    assert supervised.daemon.proc.wait(30) == 0
    assert supervised.postfix.postfix("status").returncode != 0  # the master is gone
    assert "postfix stopped" in supervised.daemon.output()


def test_a_delivery_under_way_finishes_before_postfix_stops(
    supervised: Supervised, sink: SmtpSink
) -> None:
    """Killed mid-delivery, a message the next hop already stored would go out again."""
    send(supervised.postfix.port, "slow@elsewhere.test", b"Subject: slow\r\n\r\nhello\r\n")
    sink.wait_for(1)  # stored by the next hop, whose 250 comes 3 s later
    supervised.daemon.proc.send_signal(signal.SIGTERM)
    assert supervised.daemon.proc.wait(30) == 0
    # Recorded as delivered: no recipient is left to send it to again (the queue file itself
    # goes at the next start, when the queue manager finds it done).
    left = [json.loads(entry)["recipients"] for entry in supervised.postfix.queue_ids()]
    assert all(recipients == [] for recipients in left), left
    assert "deliveries under way finished" in supervised.daemon.output()
    assert "status=sent" in supervised.daemon.output()


def test_a_master_that_dies_ends_the_supervisor_with_an_error(supervised: Supervised) -> None:
    pid = int((supervised.postfix.root / "queue/pid/master.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    assert supervised.daemon.proc.wait(30) != 0
    assert "postfix ended on its own" in supervised.daemon.output()


def test_the_agent_drops_idle_junk_and_excess_connections(supervised: Supervised) -> None:
    """Issue 13, item 7: the agent was a thread per connection with no timeout (and ran as
    root): idle sockets piled up for ever. Now one request per connection, read within
    SECUMAIL_REQUEST_TIMEOUT, at most 64 connections at once."""
    offenders = [socket.create_connection(("127.0.0.1", supervised.agent)) for _ in range(80)]
    offenders[0].sendall(bytes(range(256)) * 64)  # junk, and no end of request
    offenders[1].sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)  # endless header
    deadline = time.monotonic() + 10
    for sock in offenders:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            assert sock.recv(1) == b""  # closed: over the cap at once, the others after 1 s
        except ConnectionResetError:
            pass
        sock.close()
    assert supervised.metrics()[("secumail_postfix_up", ())] == 1  # the others are served
    assert "too many connections" in supervised.daemon.output()

