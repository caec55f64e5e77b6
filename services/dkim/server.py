"""The DKIM milter service on port 10028: milter connections in, DKIM decisions out."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from secumail import dkim_rotation
from secumail import dns as secumail_dns
from secumail.connections import ConnectionServer, IdleDeadline, read_loop, send
from secumail.dkim_keys import (
    DomainKeys,
    KeyStore,
    KeyType,
    activate,
    keygen,
    record_name,
)
from secumail.dmarc_reports import ReportStore
from secumail.dns import DnsTemporaryError
from secumail.limits import MILTER_READ_SIZE
from secumail.logs import log_event
from secumail.netaddr import peer_name
from secumail.protocols import milter as mc
from secumail.settings import Settings
from secumail.spf import SpfChecker
from secumail.txt_lookup import async_txt_lookup
from services.dkim.milter import DkimMilter, Outcome

log = logging.getLogger("secumail.dkim")


MESSAGES = Counter(
    "secumail_dkim_messages", "Messages by what the milter did (sign, verify, skip) and answered",
    ["mode", "action"],
)
END_OF_MESSAGE = Histogram(
    "secumail_dkim_end_of_message_seconds", "Time from end of message to the answer",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
PROTOCOL_ERRORS = Counter(
    "secumail_dkim_protocol_errors", "Milter connections closed on malformed input"
)
CONNECTIONS = Gauge("secumail_dkim_connections", "Open milter connections")
SIGNING_DOMAINS = Gauge("secumail_dkim_signing_domains", "Domains with a usable active key")
AWAITING_RECORD = Gauge(
    "secumail_dkim_keys_awaiting_record",
    "Rotated keys whose TXT record is not published yet (they sign once it is)")
ROTATIONS = Counter("secumail_dkim_key_rotations", "Keys rotated: a successor signs now")


@contextlib.contextmanager
def rotation_lock(keys_dir: Path) -> Iterator[bool]:
    """One replica rotates at a time (they share the keys volume): True when this one may."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    with open(keys_dir / ".rotation.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DkimService:
    def __init__(self, settings: Settings, keys: KeyStore | None = None) -> None:
        self.settings = settings
        self.keys = keys or KeyStore(settings.dkim_keys_dir,
                                     retired_days=settings.dkim_retired_days)
        self.keys.on_reload = self._keys_reloaded
        resolver = secumail_dns.make_async_resolver(settings.dns_servers, settings.dns_timeout)
        self.spf = SpfChecker(
            secumail_dns.make_resolver(settings.dns_servers, settings.dns_timeout),
            settings.hostname, settings.dns_timeout * 3)
        self.milter = DkimMilter(settings, self.keys, async_txt_lookup(resolver),
                                 self._spf_result)
        # Key rotation asks for a record that was absent a minute ago: no cached "no such
        # name" may hide it (the milter's resolver keeps answers, negative ones too).
        uncached = secumail_dns.make_async_resolver(settings.dns_servers, settings.dns_timeout)
        uncached.cache = None
        self.lookup = async_txt_lookup(uncached)
        self.milter.on_outcome = self._count
        # A drain serves Postfix's open sessions to their end: one it cut would get 451
        # for every message left in it (Postfix does not reconnect a milter mid-session).
        self.server = ConnectionServer(
            "dkim", settings.dkim_listen, self.handle, settings.dkim_max_connections,
            keep_sessions=True,
        )
        self._rotation: asyncio.Task[None] | None = None
        self._reports: asyncio.Task[None] | None = None
        self._report_store: ReportStore | None = None

    async def start(self) -> None:
        self.keys.refresh(force=True)
        await self.server.start()
        if self.settings.dkim_rotate_days > 0:
            self._rotation = asyncio.create_task(self._rotate_every())
        if self.milter.tally is not None:
            self._reports = asyncio.create_task(self._store_checks_every())

    async def drain(self, timeout: float) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
        if self._reports is not None:
            self._reports.cancel()
        await self.server.drain(timeout)
        await self.store_checks()  # what the last minute counted
        self.spf.close()

    async def _store_checks_every(self) -> None:
        while True:
            await asyncio.sleep(self.settings.dmarc_report_flush)
            await self.store_checks()

    async def store_checks(self) -> None:
        """Add the DMARC checks counted since the last time to the report store. A store that
        cannot be written loses them (said in the log): reports are statistics, and a
        message never waits for them."""
        tally = self.milter.tally
        if tally is None:
            return
        counts, published = tally.take()
        if not counts:
            return
        try:
            if self._report_store is None:
                path = Path(self.settings.dmarc_report_db)
                await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
                self._report_store = await asyncio.to_thread(ReportStore, str(path))
            left_out = await asyncio.to_thread(self._report_store.add, counts, published)
        except (OSError, sqlite3.Error) as error:
            log_event(log, "DMARC checks not stored", logging.WARNING, rows=len(counts),
                      error=f"{type(error).__name__}: {error}")
            return
        if left_out or tally.dropped:
            log_event(log, "DMARC checks over the store's bounds not counted", logging.WARNING,
                      rows=left_out, dropped=tally.dropped)
            tally.dropped = 0

    async def _rotate_every(self) -> None:
        while True:
            try:
                await self.rotate(time.time())
            except Exception as error:  # a full disk, a broken key: said, tried again later
                log_event(log, "dkim key rotation failed", logging.WARNING,
                          error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(self.settings.dkim_rotate_check)

    async def rotate(self, now: float) -> None:
        """One look: make the successors that are due, activate those whose record is out."""
        keys_dir = Path(self.settings.dkim_keys_dir)
        with rotation_lock(keys_dir) as mine:
            if not mine:
                return
            states = await asyncio.to_thread(dkim_rotation.key_states, keys_dir)
            waiting = 0
            for step in dkim_rotation.next_steps(states, now, self.settings.dkim_rotate_days):
                if step.action == "keygen":
                    taken = {k.selector for k in states if k.domain == step.domain}
                    selector = dkim_rotation.new_selector(taken, now, step.key_type)
                    key_type: KeyType = "ed25519" if step.key_type == "ed25519" else "rsa"
                    made = await asyncio.to_thread(keygen, keys_dir, step.domain, selector,
                                                   key_type, step.bits, False)
                    waiting += 1
                    log_event(log, "dkim key rotation: publish the successor's record",
                              logging.WARNING, domain=step.domain, selector=selector,
                              name=made.record_name, value=made.record_value)
                    continue
                name = record_name(step.domain, step.selector)
                try:
                    answer = await self.lookup(name)
                except DnsTemporaryError:
                    answer = None
                if not dkim_rotation.record_published(answer, step.record_value):
                    waiting += 1
                    log_event(log, "dkim key rotation: awaiting the successor's record",
                              domain=step.domain, selector=step.selector, name=name)
                    continue
                selectors = await asyncio.to_thread(activate, keys_dir, step.domain,
                                                    step.selector)
                ROTATIONS.inc()
                log_event(log, "dkim key rotated: the successor signs", domain=step.domain,
                          selector=step.selector, signing=",".join(selectors))
            AWAITING_RECORD.set(waiting)
        self.keys.refresh(force=True)

    async def _spf_result(self, client: str, sender: str, helo: str) -> str:
        return (await self.spf.check(client, sender, helo)).result

    @staticmethod
    def _count(outcome: Outcome) -> None:
        MESSAGES.labels(outcome.mode, outcome.action).inc()
        END_OF_MESSAGE.observe(outcome.seconds)

    @staticmethod
    def _keys_reloaded(domains: dict[str, DomainKeys]) -> None:
        usable = 0
        for domain, keys in sorted(domains.items()):
            if keys.error:
                log_event(log, "signing key unusable", logging.ERROR, domain=domain,
                          error=keys.error)
            elif keys.keys:
                usable += 1
                log_event(log, "signing keys", domain=domain,
                          selectors=",".join(f"{k.selector}/{k.key_type}" for k in keys.keys))
            else:
                log_event(log, "no active key", logging.WARNING, domain=domain,
                          hint="secumail-dkim activate DOMAIN SELECTOR")
        SIGNING_DOMAINS.set(usable)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_text = peer_name(writer.get_extra_info("peername"))
        decoder = mc.MilterDecoder()
        session = self.milter.session(peer_text)

        async def received(data: bytes) -> bool:
            out = b""
            try:
                for command in decoder.feed(data):
                    if isinstance(command, mc.EndOfMessage):
                        with self.server.inflight.track():
                            out += await session.end_of_message(command)
                    elif isinstance(command, mc.Quit):
                        return False
                    else:
                        out += session.handle(command)
            except mc.MilterProtocolError as error:
                self._malformed(writer, peer_text, session.queue_id, str(error))
                return False
            if out:
                await send(writer, out)
            return True

        def idle_out(reason: str) -> None:
            PROTOCOL_ERRORS.inc()
            log_event(log, "closing connection", logging.WARNING, peer=peer_text,
                      reason=reason, queue_id=session.queue_id)

        def ended() -> None:
            if decoder.pending or session.in_message:
                log_event(log, "connection closed mid-message", logging.WARNING,
                          peer=peer_text, queue_id=session.queue_id)

        CONNECTIONS.inc()
        try:
            await read_loop(
                reader, IdleDeadline(writer, self.settings.dkim_idle_timeout,
                                     self.settings.request_timeout), MILTER_READ_SIZE, received,
                mid_request=lambda: decoder.pending, idle_out=idle_out, ended=ended)
        finally:
            CONNECTIONS.dec()

    def _malformed(self, writer: asyncio.StreamWriter, peer: str, queue_id: str,
                   error: str) -> None:
        """Answer the message in progress as SECUMAIL_DKIM_FAIL_OPEN says, then hang up."""
        PROTOCOL_ERRORS.inc()
        fail_open = self.settings.dkim_fail_open
        log_event(log, "malformed milter packet: closing connection", logging.WARNING,
                  peer=peer, queue_id=queue_id, error=error,
                  answer="accept" if fail_open else "tempfail")
        writer.write(mc.ACCEPT if fail_open else mc.TEMPFAIL)
