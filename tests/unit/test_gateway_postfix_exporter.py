"""Postfix's metrics as the Postfix container serves them to the gateway: counters fed with
log lines as Postfix 3.7 writes them, queue sizes counted from the queue folders, and the
probe mailbox the gateway's canaries land in. No sockets, no Postfix: files and strings."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from secumail.netaddr import parse_network
from secumail.settings import Settings
from services.postfix.exporter import (
    STALE_CANARY,
    LogStats,
    ProbeMailbox,
    QueueCollector,
    count_files,
    probe_maildir,
)

# Lines of a real session (tests/service/test_gateway_postfix.py reads a live Postfix's),
# with the filter hand-off and the re-injection as the compose stack logs them.
LOG = [
    'Nov 28 01:15:55 mx postfix/smtpd[2277]: connect from localhost[127.0.0.1]',
    'Nov 28 01:15:55 mx postfix/smtpd[2277]: 1363D21A85E: '
    'client=mail.remote.test[203.0.113.7]',
    'Nov 28 01:15:55 mx postfix/cleanup[2282]: 1363D21A85E: message-id=<x@remote.test>',
    'Nov 28 01:15:55 mx postfix/qmgr[2275]: 1363D21A85E: from=<a@remote.test>, size=318, '
    'nrcpt=1 (queue active)',
    'Nov 28 01:15:55 mx postfix/smtp[2283]: 1363D21A85E: to=<bob@secumail.test>, '
    'relay=clamav[172.29.125.3]:10025, delay=0.2, delays=0.01/0.01/0/0.2, dsn=2.0.0, '
    'status=sent (250 2.0.0 Ok: queued as 99)',
    'Nov 28 01:15:55 mx postfix/smtpd[2290]: 4AAAA21A85E: client=unknown[172.29.125.2]',
    'Nov 28 01:15:55 mx postfix/virtual[2291]: 4AAAA21A85E: to=<bob@secumail.test>, '
    'relay=virtual, delay=0.01, delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to maildir)',
    'Nov 28 01:15:56 mx postfix/smtp[2283]: 5BBBB21A85E: to=<bob@secumail.test>, relay=none, '
    'delay=30, delays=0/0/30/0, dsn=4.4.1, status=deferred (connect to '
    'clamav[172.29.125.3]:10025: Connection refused)',
    'Nov 28 01:15:57 mx postfix/smtp[2284]: 197C521A832: to=<a@example.org>, relay=none, '
    'delay=0, delays=0/0/0/0, dsn=5.4.4, status=bounced (unable to look up host example.org)',
    'Nov 28 01:15:58 mx postfix/smtpd[2277]: NOQUEUE: reject: RCPT from '
    'unknown[203.0.113.66]: 554 5.7.1 Service unavailable; client [203.0.113.66] blocked '
    'using rbl.test; from=<a@remote.test> to=<bob@secumail.test> proto=ESMTP '
    'helo=<mail.remote.test>',
    'Nov 28 01:15:59 mx postfix/smtpd[2277]: NOQUEUE: reject: RCPT from unknown[203.0.113.7]:'
    ' 450 4.7.1 <bob@secumail.test>: Recipient address rejected: Greylisted; '
    'from=<a@remote.test> to=<bob@secumail.test> proto=ESMTP helo=<mail.remote.test>',
    'Nov 28 01:16:00 mx postfix/pickup[2300]: 6CCCC21A85E: uid=0 from=<root>',
    'Nov 28 01:16:01 mx postfix/submission/smtpd[2301]: 7DDDD21A85E: '
    'client=laptop[198.51.100.9]',
    'not a postfix line at all',
]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_log_lines_become_counters() -> None:
    registry = CollectorRegistry()
    stats = LogStats(registry, "clamav", parse_network("172.29.125.0/24"))
    for line in LOG:
        stats.feed(line)
    found = samples(registry)
    assert found[("secumail_postfix_messages_received_total", (("source", "smtp"),))] == 2
    assert found[("secumail_postfix_messages_received_total", (("source", "filters"),))] == 1
    assert found[("secumail_postfix_messages_received_total", (("source", "local"),))] == 1
    deliveries = {labels: v for (name, labels), v in found.items()
                  if name == "secumail_postfix_deliveries_total"}
    assert deliveries == {
        (("status", "sent"), ("via", "filter")): 1,
        (("status", "sent"), ("via", "virtual")): 1,
        (("status", "deferred"), ("via", "filter")): 1,
        (("status", "bounced"), ("via", "smtp")): 1,
    }
    assert found[("secumail_postfix_smtpd_rejects_total", (("code", "554"),))] == 1
    assert found[("secumail_postfix_smtpd_rejects_total", (("code", "450"),))] == 1


def test_queue_sizes_count_hashed_subfolders(tmp_path: Path) -> None:
    for name in ("active/A1", "active/A2", "deferred/3/3F00", "deferred/7/7A01",
                 "deferred/7/7A02", "hold/B/B1"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert count_files(tmp_path / "deferred") == 3
    assert count_files(tmp_path / "missing") == 0
    registry = CollectorRegistry()
    running = threading.Event()
    registry.register(QueueCollector(tmp_path, running))
    found = samples(registry)
    assert found[("secumail_postfix_queue_messages", (("queue", "active"),))] == 2
    assert found[("secumail_postfix_queue_messages", (("queue", "deferred"),))] == 3
    assert found[("secumail_postfix_queue_messages", (("queue", "hold"),))] == 1
    assert found[("secumail_postfix_queue_messages", (("queue", "incoming"),))] == 0
    assert found[("secumail_postfix_up", ())] == 0
    running.set()
    assert samples(registry)[("secumail_postfix_up", ())] == 1


def write_mail(folder: Path, name: str, text: str, age: float = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    return path


TOKEN = "0123456789abcdef0123456789abcdef"


def test_probe_mailbox_finds_reads_and_removes_a_canary(tmp_path: Path) -> None:
    settings = Settings(domains=["secumail.test"], probe_mailbox="probe@secumail.test")
    maildir = probe_maildir(settings, str(tmp_path))
    assert maildir == tmp_path / "secumail.test" / "probe"
    write_mail(maildir / "new", "1.real", "Subject: a real mail\n\nhello\n")
    write_mail(maildir / "new", "2.canary",
               f"X-Spam-Flag: NO\nX-AV-Checked: ClamAV\n  folded\nX-SecuMail-Probe: {TOKEN}\n"
               "Subject: canary\n\nbody\n")
    mailbox = ProbeMailbox(maildir)
    assert mailbox.headers("f" * 32) is None
    found = mailbox.headers(TOKEN)
    assert found is not None and found["token"] == TOKEN
    assert ["X-AV-Checked", "ClamAV folded"] in found["headers"]
    assert found["delivered_at"] > 0
    assert mailbox.remove(TOKEN)
    assert not mailbox.remove(TOKEN)
    assert sorted(os.listdir(maildir / "new")) == ["1.real"]


def test_stale_canaries_are_purged_and_other_mail_kept(tmp_path: Path) -> None:
    new = tmp_path / "new"
    write_mail(new, "old.canary", f"X-SecuMail-Probe: {TOKEN}\n\n", age=STALE_CANARY + 60)
    write_mail(new, "old.real", "Subject: old\n\n", age=STALE_CANARY + 60)
    write_mail(new, "fresh.canary", f"X-SecuMail-Probe: {'a' * 32}\n\n")
    mailbox = ProbeMailbox(tmp_path)
    assert mailbox.purge_stale(time.time()) == 1
    assert sorted(os.listdir(new)) == ["fresh.canary", "old.real"]


def test_before_queue_refusals_are_counted_as_rejects() -> None:
    registry = CollectorRegistry()
    stats = LogStats(registry, "clamav", parse_network("172.29.125.0/24"))
    stats.feed("Nov 29 10:00:00 mx postfix/smtpd[7]: NOQUEUE: proxy-reject: END-OF-MESSAGE: "
               "554 5.7.0 Message refused: virus found (Eicar-Test-Signature); "
               "from=<a@b.test> to=<c@d.test> proto=ESMTP helo=<x>")
    found = samples(registry)
    assert found[("secumail_postfix_smtpd_rejects_total", (("code", "554"),))] == 1

