"""Backup and restore on the running stack (issue 32, item 1): state of every kind made, a
backup taken while the stack runs, `down -v`, the backup restored into fresh volumes, `up`:
everything is back, and the mail that was deferred is delivered, once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from testkit import mail
from tests.e2e.conftest import CHAIN_SERVICES, Stack
from tests.e2e.test_gateway import QUARANTINE_SCRIPT, Gateway
from tests.e2e.test_stack import BOT_HELO, attempt

LOCAL = "127.0.0.41"  # a host of ours (XCLIENT), in SECUMAIL_MYNETWORKS


def compose(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*stack.compose, *args], capture_output=True, text=True)
    assert not check or done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


def wait(what: str, predicate, stack: Stack, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}\n{stack.logs('postfix')[-3000:]}"
        time.sleep(1)


def queued(stack: Stack) -> list[dict[str, object]]:
    listing = stack.exec("postfix", "postqueue", "-j").stdout
    return [json.loads(line) for line in listing.splitlines() if line.strip()]


def test_a_backup_brings_everything_back_into_a_fresh_stack(stack: Stack) -> None:
    gateway = Gateway(stack)
    tag = uuid.uuid4().hex[:8]
    backups = Path(os.environ["SECUMAIL_E2E_DIR"]) / "backups"
    os.environ["SECUMAIL_BACKUP_DIR"] = str(backups)

    # Mail in a mailbox.
    kept = f"kept {tag}"
    code, reply = attempt(stack, LOCAL, "ops@secumail.test", "alice@secumail.test",
                          mail.plain(subject=kept, sender="ops@secumail.test",
                                     to="alice@secumail.test"))
    assert code == 250, reply
    wait("the mail for alice", lambda: any(m["Subject"] == kept
                                           for m in stack.mailbox("alice")), stack)
    # Mail deferred in the queue: the relay host (the sink) is down.
    compose(stack, "stop", "sink")
    later = f"deferred {tag}"
    code, reply = attempt(stack, LOCAL, "ops@secumail.test", "ops@elsewhere.test",
                          mail.plain(subject=later, sender="ops@secumail.test",
                                     to="ops@elsewhere.test"))
    assert code == 250, reply
    wait("the deferred mail", lambda: any(q.get("queue_name") == "deferred"
                                          for q in queued(stack)), stack)
    # A quarantined message, a DKIM key, a greylisted triplet, tracking history.
    made = stack.exec("clamav", "/opt/secumail/bin/python", "-c", QUARANTINE_SCRIPT,
                      f"quarantined {tag}")
    assert made.returncode == 0, made.stderr
    ident = made.stdout.strip()
    selector = f"bk{tag}"
    keygen = stack.exec("dkim", "/opt/secumail/bin/secumail-dkim", "keygen", "backup.test",
                        "--selector", selector, "--bits", "1024")
    assert keygen.returncode == 0, keygen.stderr
    grey = f"grey.{tag}@remote.test"
    code, reply = attempt(stack, "203.0.113.77", grey, "bob@secumail.test", helo=BOT_HELO)
    assert code == 450 and b"Greylisted" in reply, reply
    wait("the tracking events", lambda: gateway.request(
        "GET", f"/admin/tracking?sender={grey}")[1]["messages"] != [], stack)

    done = compose(stack, "run", "--rm", "backup", "create")
    made_backup = json.loads(done.stdout.strip().splitlines()[-1])
    assert made_backup["redis"] == "bgsave", made_backup
    assert made_backup["queue_files"] >= 1 and "tracking/tracking.db" in made_backup["sqlite"]
    archive = Path(made_backup["archive"]).name
    assert (backups / archive).exists()

    compose(stack, "down", "-v")
    restored = json.loads(compose(stack, "run", "--rm", "backup", "restore",
                                  f"/backups/{archive}").stdout.strip().splitlines()[-1])
    assert restored["restored"]["mail"] >= 1, restored
    compose(stack, "up", "-d")
    stack.wait_healthy([*CHAIN_SERVICES, "gateway"])

    assert any(m["Subject"] == kept for m in stack.mailbox("alice"))
    status, item = gateway.request("GET", f"/admin/quarantine/{ident}")
    assert status == 200 and item["subject"] == f"quarantined {tag}", item
    keys = gateway.request("GET", "/admin/dkim/keys")[1]
    assert selector in [k["selector"] for k in keys], keys
    entries = gateway.request("GET", f"/admin/greylist/entries?match={grey}")[1]
    assert [e["sender"] for e in entries] == [grey], entries
    messages = gateway.request("GET", f"/admin/tracking?sender={grey}")[1]["messages"]
    assert messages, "tracking history lost"
    # The deferred mail leaves once its relay host is back, and only once.
    stack.exec("postfix", "postqueue", "-f")
    wait("the deferred mail at the sink",
         lambda: any(m["Subject"] == later for m in stack.sink()), stack)
    time.sleep(3)
    assert [m["Subject"] for m in stack.sink()].count(later) == 1
