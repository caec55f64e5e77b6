"""A content filter as a service: its listener, its drain, and the factory every filter
(services/clamav, services/spamd) is made with, from the shared settings."""

from __future__ import annotations

import asyncio
import logging

from secumail.access import AllowedClients
from secumail.filter.aiosmtpd_adapter import FilterSMTP
from secumail.filter.session import Filter
from secumail.filter.verdicts import Inspector
from secumail.logs import log_event
from secumail.netaddr import HostPort
from secumail.quarantine import Quarantine
from secumail.settings import Settings

log = logging.getLogger("secumail.filter")


class FilterService:
    """A content filter: an SMTP listener whose messages go through its Filter."""

    def __init__(self, filter: Filter, listen: HostPort, message_size_limit: int,
                 idle_timeout: float) -> None:
        self.filter = filter
        self.name = filter.name
        self.listen = listen
        self.message_size_limit = message_size_limit
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None

    def _protocol(self) -> FilterSMTP:
        return FilterSMTP(
            self.filter, data_size_limit=self.message_size_limit, enable_SMTPUTF8=True,
            decode_data=False, hostname=self.filter.hostname,
            ident=f"SecuMail {self.name} filter", timeout=self.idle_timeout,
            loop=asyncio.get_running_loop(),
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.listen.host, self.listen.port, reuse_address=True
        )
        log_event(log, "listening", filter=self.name, listen=str(self.listen),
                  next_hop=str(self.filter.next_hop.address))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let messages being scanned or relayed finish, then close."""
        self.filter.draining = True
        self.filter.kept.close_all()
        if self._server is not None:
            self._server.close()
        if not await self.filter.inflight.wait_idle(timeout):
            log_event(log, "drain timed out", logging.WARNING, filter=self.name)


def filter_service(
    name: str, listen: HostPort, next_hop: HostPort, allowed_clients: list[str],
    inspect: Inspector, settings: Settings,
) -> FilterService:
    """A content filter from the shared settings: only its name, ports, clients and
    inspector differ."""
    filter = Filter(
        name, next_hop, inspect, settings.hostname, settings.relay_timeout,
        Quarantine(settings.quarantine_dir, settings.quarantine_limits),
        settings.filter_max_connections,
        AllowedClients(allowed_clients), settings.filter_mode == "before-queue",
        settings.trusted_networks,
    )
    return FilterService(filter, listen, settings.message_size_limit,
                         settings.filter_idle_timeout)
