"""Postfix's metrics and the probe mailbox, served on the container's metrics listener.

- Queue sizes are counted at scrape time from the queue directories (one `scandir` walk per
  queue; no `postqueue`, which reads every message file and needs the showq service).
- Message counts come from Postfix's own log stream (`maillog_file = /dev/stdout`), which
  the supervisor reads anyway to pass it on: one regular expression per line.
- `GET /probe/<token>` answers the headers of the gateway's canary message with that token
  once it sits in the probe mailbox; `DELETE /probe/<token>` removes it. The gateway cannot
  read the mailboxes itself: they belong to the vmail user, mode 0700.
- The HTTP side runs in a child process of its own (agent.py), as the mailboxes' owner,
  never as root; it asks this process, which counts, for the metrics text.
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from secumail import tracking
from secumail.chain import PROBE_HEADER
from secumail.netaddr import Network
from secumail.probes import NOBODY
from secumail.settings import Settings
from secumail.tlsrpt import Policy
from services.postfix.children import ChildKeeper
from services.postfix.events import (
    CLIENT,
    LINE,
    STATUS,
    PostfixEvents,
    TlsSessions,
    refusal_code,
)
from services.postfix.outbound_tls import cached_policies

log = logging.getLogger("secumail.postfix")

ASK_EVENTS = b"e"
AFTER = struct.Struct(">Q")
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
TOKEN = re.compile(r"^[0-9a-f]{32}$")
STALE_CANARY = 86400.0  # a canary nobody collected (the gateway restarted mid-probe)


class LogStats:
    """Counters fed with Postfix's log lines. Label values come from small sets: daemon
    names, delivery statuses, SMTP reply codes."""

    def __init__(self, registry: CollectorRegistry, filter_host: str, filter_subnet: Network
                 ) -> None:
        self.filter_relay = f"{filter_host}["
        self.filter_subnet = filter_subnet
        self.received = Counter(
            "secumail_postfix_messages_received",
            "Messages Postfix queued, by source: smtp (port 25 and others), filters (mail "
            "back from the content filters), local (sendmail, bounces are not counted)",
            ["source"], registry=registry,
        )
        self.deliveries = Counter(
            "secumail_postfix_deliveries",
            "Delivery attempts by status (sent, deferred, bounced, expired) and where to: "
            "filter (the content filter chain) or the delivering daemon (virtual, smtp, lmtp)",
            ["status", "via"], registry=registry,
        )
        self.rejects = Counter(
            "secumail_postfix_smtpd_rejects", "Commands smtpd refused, by SMTP reply code",
            ["code"], registry=registry,
        )

    def feed(self, line: str) -> None:
        found = LINE.search(line)
        if found is None:
            return
        daemon, text = found.group("daemon"), found.group("text")
        if daemon in ("smtpd", "postscreen"):
            if client := CLIENT.match(text):
                self.received.labels(self._source(client.group("ip"))).inc()
            elif code := refusal_code(text):  # before-queue, the filters' too (proxy-reject)
                self.rejects.labels(code).inc()
        elif daemon == "pickup" and " uid=" in text:
            self.received.labels("local").inc()
        elif status := STATUS.match(text):
            # A refused connection says relay=none, then "(connect to clamav[...]: ...)".
            to_filter = status.group("relay").startswith(self.filter_relay) or (
                f"connect to {self.filter_relay}" in text
            )
            via = "filter" if to_filter else daemon
            self.deliveries.labels(status.group("status"), via).inc()

    def _source(self, ip: str) -> str:
        try:
            return "filters" if ipaddress.ip_address(ip) in self.filter_subnet else "smtp"
        except ValueError:
            return "smtp"


def count_files(directory: Path) -> int:
    """Regular files under `directory`, in hashed subfolders too (deferred/, hold/)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    total += count_files(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += 1
    except FileNotFoundError:
        pass
    return total


class QueueCollector(Collector):
    """Queue sizes, counted when Prometheus asks (through the gateway)."""

    def __init__(self, queue_dir: Path, running: threading.Event) -> None:
        self.queue_dir = queue_dir
        self.running = running

    def collect(self) -> Iterable[GaugeMetricFamily]:
        queues = GaugeMetricFamily(
            "secumail_postfix_queue_messages", "Messages in each Postfix queue", labels=["queue"]
        )
        for queue in QUEUES:
            queues.add_metric([queue], count_files(self.queue_dir / queue))
        yield queues
        yield GaugeMetricFamily(
            "secumail_postfix_up", "1 while Postfix's master process runs",
            value=1 if self.running.is_set() else 0,
        )


class ProbeMailbox:
    """The gateway's canaries in the probe mailbox's Maildir (new/ only: where they land)."""

    def __init__(self, maildir: Path) -> None:
        self.new = maildir / "new"
        self._tokens: dict[str, str] = {}  # file name -> token ("" for other mail)
        self._lock = threading.Lock()

    def _scan(self) -> dict[str, str]:
        try:
            names = set(os.listdir(self.new))
        except FileNotFoundError:
            names = set()
        with self._lock:
            # Maildir file names are unique and never rewritten: read each file once.
            self._tokens = {n: t for n, t in self._tokens.items() if n in names}
            for name in names - set(self._tokens):
                self._tokens[name] = self._token_of(self.new / name)
            return dict(self._tokens)

    @staticmethod
    def _token_of(path: Path) -> str:
        try:
            with open(path, "rb") as handle:
                head = handle.read(65536).split(b"\n\n", 1)[0]
        except OSError:
            return ""
        found = re.search(rb"^" + PROBE_HEADER.encode() + rb":\s*([0-9a-f]{32})\s*$", head,
                          re.M | re.I)
        return found.group(1).decode() if found else ""

    def find(self, token: str) -> Path | None:
        for name, found in self._scan().items():
            if found == token:
                return self.new / name
        return None

    def headers(self, token: str) -> dict[str, Any] | None:
        path = self.find(token)
        if path is None:
            return None
        try:
            data = path.read_bytes()
            delivered = path.stat().st_mtime
        except OSError:
            return None
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        return {
            "token": token,
            "delivered_at": delivered,
            "headers": [[name, " ".join(str(value).split())] for name, value in parsed.items()],
        }

    def remove(self, token: str) -> bool:
        path = self.find(token)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True

    def purge_stale(self, now: float) -> int:
        removed = 0
        for name, token in self._scan().items():
            path = self.new / name
            try:
                if token and now - path.stat().st_mtime > STALE_CANARY:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


class AgentKeeper(ChildKeeper):
    """Runs the HTTP agent (agent.py) as `user` (None: this process's own user), answers its
    questions for the metrics over a socket pair, and starts it again if it ends."""

    def __init__(self, registry: CollectorRegistry, mailbox_base: str, user: int | None,
                 events: tracking.EventLog = tracking.EVENTS) -> None:
        super().__init__("metrics agent", user)
        self.registry = registry
        self.events = events
        self.mailbox_base = mailbox_base

    def run_once(self) -> int:
        ours, theirs = socket.socketpair()
        try:
            child = self.spawn([sys.executable, "-m", "services.postfix.agent",
                                str(theirs.fileno()), self.mailbox_base],
                               pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        with ours:
            self._answer(ours)
        return child.wait()

    def _answer(self, channel: socket.socket) -> None:
        """Until the agent closes its end: b"m" asks for the exposition; b"e" and an 8-byte
        number for the tracking events numbered above it. A length, then the answer."""
        while ask := channel.recv(1):
            if ask == ASK_EVENTS:
                (after,) = AFTER.unpack(_receive(channel, AFTER.size))
                answer = self.events.since(after)
            else:
                answer = generate_latest(self.registry)
            channel.sendall(struct.pack(">I", len(answer)) + answer)


def _receive(channel: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the agent closed the channel mid-question")
        data += chunk
    return data


def agent_user(mailbox_base: str) -> int | None:
    """The agent runs as the mailboxes' owner (it reads the probe mailbox), never as root:
    `nobody` when root owns them. None when this process is not root (it cannot switch)."""
    if os.geteuid() != 0:
        return None
    try:
        owner = os.stat(mailbox_base).st_uid
    except OSError:
        owner = 0
    return owner or NOBODY


def probe_maildir(settings: Settings, mailbox_base: str) -> Path:
    """The probe mailbox's Maildir, laid out as render.mailbox_map lays out every mailbox."""
    local, _, domain = settings.probe_address.rpartition("@")
    return Path(mailbox_base) / domain / local


def start_agent(settings: Settings, queue_dir: Path, mailbox_base: str,
                running: threading.Event, user: int | None = None
                ) -> tuple[Callable[[str], None], AgentKeeper | None]:
    """What each log line feeds (the counters, the tracking events), and the HTTP agent
    run as `user` (port 0: none), kept by a thread of this process."""
    registry = CollectorRegistry()
    stats = LogStats(registry, settings.content_filter_address.host, settings.filter_subnet)
    registry.register(QueueCollector(queue_dir, running))
    tracking.EVENTS.configure(settings.tracking_buffer, settings.tracking)
    events = PostfixEvents(settings.content_filter_address.host)
    # TLS reports count sessions with destinations' MX hosts: none when a relay takes all.
    sessions = None
    if settings.tlsrpt and not settings.relayhost:
        policies = cached_policies() if settings.outbound_mta_sts else lambda _: Policy()
        sessions = TlsSessions(settings.content_filter_address.host, policies,
                               settings.domains)

    def feed(line: str) -> None:
        stats.feed(line)
        if tracking.EVENTS.enabled:
            if (found := events.feed(line)) is not None:
                tracking.record(found)
            if sessions is not None:
                for session in sessions.feed(line):
                    tracking.record(session)

    if settings.metrics_listen.port == 0:
        return feed, None
    keeper = AgentKeeper(registry, mailbox_base, user)
    keeper.start()
    return feed, keeper
