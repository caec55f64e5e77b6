"""Fixtures of the service tests: the two content filters as real processes."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.processes import Daemon, free_port, service_env, start_service
from testkit.scanners import Clamd, Spamd
from testkit.sink import SmtpSink


class Chain:
    def __init__(self, clamav: Daemon, spamd: Daemon, port: int, quarantine: Path) -> None:
        self.clamav, self.spamd, self.port, self.quarantine = clamav, spamd, port, quarantine

    def send(
        self,
        message: bytes,
        recipients: tuple[str, ...] = ("bob@secumail.test",),
        sender: str = "alice@secumail.test",
    ) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as smtp:
            return smtp.sendmail(sender, list(recipients), message)  # type: ignore[return-value]


StartChain = Callable[..., Chain]


@pytest.fixture
def chain(tmp_path: Path, clamd: Clamd, spamd: Spamd, sink: SmtpSink) -> Iterator[StartChain]:
    """Start clamav filter -> spamd filter -> (the sink, or `spamd_next_hop`)."""
    daemons: list[Daemon] = []

    def start(**overrides: str) -> Chain:
        clamav_port, spamd_port = free_port(), free_port()
        quarantine = tmp_path / "quarantine"
        common = {
            "clamd_address": clamd.address,
            "spamassassin_address": spamd.address,
            "quarantine_dir": str(quarantine),
            "relay_timeout": "30",
        }
        settings = {**common, **overrides}
        spamd_filter = start_service(
            "secumail-spamd",
            service_env(
                spamd_listen=f"127.0.0.1:{spamd_port}",
                spamd_next_hop=settings.pop("spamd_next_hop", f"127.0.0.1:{sink.port}"),
                **settings,
            ),
            "SECUMAIL_SPAMD_LISTEN",
        )
        daemons.append(spamd_filter)
        clamav_filter = start_service(
            "secumail-clamav",
            service_env(
                clamav_listen=f"127.0.0.1:{clamav_port}",
                clamav_next_hop=f"127.0.0.1:{spamd_port}",
                **settings,
            ),
            "SECUMAIL_CLAMAV_LISTEN",
        )
        daemons.append(clamav_filter)
        return Chain(clamav_filter, spamd_filter, clamav_port, quarantine)

    yield start
    for daemon in daemons:
        daemon.stop()
