"""The promise under load and faults: every message accepted is delivered exactly once, or
stays queued until it can be; nothing is let through unscanned while a scanner is down.

The default suite sends SECUMAIL_FAULT_MESSAGES (300) messages while one clamav replica is
killed and restarted, clamd and spamd are stopped and started again, and the Postfix
container is restarted with mail in its queue. `SECUMAIL_FAULT_MESSAGES=10000 pytest
tests/e2e/test_faults.py -s` is the full run; it prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import smtplib
import subprocess
import threading
import time
import uuid
from collections import Counter
from email.message import EmailMessage
from email.utils import make_msgid

from tests.e2e.conftest import Stack

MESSAGES = int(os.environ.get("SECUMAIL_FAULT_MESSAGES", "300"))
SESSIONS = 20


def make_message(tag: str, n: int, rng: random.Random) -> bytes:
    """Mixed sizes, 1 KB to 1 MB, a few with an attachment; the subject names it."""
    message = EmailMessage()
    message["From"] = "load@secumail.test"
    message["To"] = "dave@secumail.test"
    message["Subject"] = f"{tag} {n}"
    message["Message-ID"] = make_msgid(idstring=f"{tag}.{n}", domain="secumail.test")
    size = rng.choice([1_000] * 6 + [20_000] * 3 + [1_000_000])
    message.set_content(("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size] + "\n")
    if n % 25 == 0:
        payload = rng.randbytes(30_000)  # binary, base64-encoded, nothing a scanner flags
        message.add_attachment(
            payload, maintype="application", subtype="octet-stream", filename=f"{n}.bin"
        )
    return message.as_bytes()


class Sender:
    """Sends every message like an MTA would: a 4xx or a broken connection means retry."""

    def __init__(self, stack: Stack, tag: str) -> None:
        self.stack, self.tag = stack, tag
        self.todo = list(range(MESSAGES))
        self.accepted: list[int] = []
        self.retries = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self.session, args=(i,)) for i in range(SESSIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def session(self, index: int) -> None:
        client = f"127.0.1.{index + 1}"  # mynetworks: no greylisting, the filters still scan
        while True:
            with self.lock:
                if not self.todo:
                    return
                n = self.todo.pop()
            body = make_message(self.tag, n, random.Random(n))
            while not self.send_one(client, n, body):
                with self.lock:
                    self.retries += 1
                time.sleep(1)

    def send_one(self, client: str, n: int, body: bytes) -> bool:
        try:
            with smtplib.SMTP(self.stack.smtp_host, self.stack.smtp_port, timeout=60) as smtp:
                smtp.ehlo("load.secumail.test")
                if smtp.docmd("XCLIENT", f"ADDR={client}")[0] != 220:
                    return False
                smtp.ehlo("load.secumail.test")
                smtp.sendmail("load@secumail.test", ["dave@secumail.test"], body)
        except (smtplib.SMTPException, OSError) as error:
            if isinstance(error, smtplib.SMTPResponseException) and error.smtp_code >= 500:
                raise
            return False
        with self.lock:
            self.accepted.append(n)
        return True


def compose(stack: Stack, *args: str) -> None:
    subprocess.run([*stack.compose, *args], check=True, capture_output=True)


def flush(stack: Stack) -> None:
    """What an operator does after an outage: ask Postfix to retry its deferred mail now."""
    stack.exec("postfix", "postqueue", "-f")


def delivered(stack: Stack, tag: str) -> Counter[str]:
    """How many times each message of this run arrived, by subject."""
    return Counter(
        m["Subject"] for m in stack.headers("dave") if (m["Subject"] or "").startswith(tag + " ")
    )


def test_nothing_lost_nothing_doubled_through_faults(stack: Stack) -> None:
    tag = "load-" + uuid.uuid4().hex[:8]
    sender = Sender(stack, tag)
    started = time.monotonic()
    sending = threading.Thread(target=sender.run)
    sending.start()
    figures: dict[str, float] = {}

    # 1. Kill one clamav filter replica and start it again.
    victim = stack.containers("clamav")[0]
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    time.sleep(3)
    subprocess.run(["docker", "start", victim], check=True, capture_output=True)

    # 2. and 3. Stop clamd, then spamd, for a while each: mail waits in Postfix's queue.
    for scanner in ("clamd", "spamassassin"):
        compose(stack, "stop", scanner)
        time.sleep(15)
        unscanned = [
            m
            for m in stack.headers("dave")
            if (m["Subject"] or "").startswith(tag)
            and (
                (scanner == "clamd" and not m["X-AV-Checked"])
                or (scanner == "spamassassin" and not m["X-Spam-Flag"])
            )
        ]
        assert unscanned == [], f"delivered unscanned while {scanner} was down"
        compose(stack, "start", scanner)
        stack.wait_healthy([scanner, "clamav", "spamd"])
        outage_end = time.monotonic()
        flush(stack)
        figures[f"queue drained after {scanner} outage (s)"] = (
            wait_for_empty_queue(stack) - outage_end
        )

    # 4. Restart Postfix with mail in its queue (clamd down, so the queue fills).
    compose(stack, "stop", "clamd")
    time.sleep(5)
    queued_before = len(queue(stack))
    compose(stack, "restart", "postfix")
    compose(stack, "start", "clamd")
    stack.wait_healthy(["clamd", "postfix"])
    flush(stack)

    sending.join()
    accepted_at = time.monotonic()
    deadline = time.monotonic() + 600
    while sum(delivered(stack, tag).values()) < len(sender.accepted):
        assert time.monotonic() < deadline, (
            f"{len(sender.accepted)} accepted, {delivered(stack, tag)}"
        )
        flush(stack)
        time.sleep(3)
    time.sleep(5)  # a duplicate would come right behind
    counts = delivered(stack, tag)
    total = time.monotonic() - started
    assert sorted(sender.accepted) == list(range(MESSAGES))
    lost = [n for n in sender.accepted if counts[f"{tag} {n}"] == 0]
    doubled = [subject for subject, count in counts.items() if count > 1]
    figures.update(
        {
            "messages": MESSAGES,
            "sender retries (4xx/connection)": sender.retries,
            "queued when Postfix restarted": queued_before,
            "lost": len(lost),
            "duplicated": len(doubled),
            "messages/s, outages included": MESSAGES / total,
            "seconds from last acceptance to last delivery": time.monotonic() - accepted_at,
        }
    )
    print(
        "\nfault run:",
        "; ".join(
            f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in figures.items()
        ),
    )
    assert lost == [] and doubled == []


def queue(stack: Stack) -> list[dict[str, object]]:
    lines = stack.exec("postfix", "postqueue", "-j").stdout.splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def wait_for_empty_queue(stack: Stack, timeout: float = 300) -> float:
    """When no message is left deferred (new mail keeps flowing through meanwhile)."""
    deadline = time.monotonic() + timeout
    while any(entry.get("queue_name") == "deferred" for entry in queue(stack)):
        assert time.monotonic() < deadline, "Postfix's deferred queue does not drain"
        flush(stack)
        time.sleep(1)
    return time.monotonic()
