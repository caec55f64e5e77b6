"""Process runtime shared by every service: logging, metrics, signals, graceful drain
(the connections themselves: secumail/connections.py).

A service is an object with `start()` (bind its listeners) and `drain(timeout)` (stop
accepting, let in-flight work finish, close). `run_service` wires it to SIGTERM/SIGINT, so
`docker stop` never cuts a mail transaction in half.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

import uvloop

from secumail import tracking
from secumail.logs import log_event, setup_logging
from secumail.metrics import start_metrics_listener
from secumail.settings import Settings, misplaced_secrets

log = logging.getLogger("secumail.runtime")


class Service(Protocol):
    async def start(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...


async def serve_until_signalled(service: Service, drain_timeout: float) -> None:
    """Start `service`, wait for SIGTERM or SIGINT, then drain it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    log_event(log, "stopping: draining in-flight work", timeout=drain_timeout)
    await service.drain(drain_timeout)
    log_event(log, "stopped")


def warn_misplaced_secrets(service: str) -> None:
    for variable in misplaced_secrets():
        log_event(log, "a secret is given to a service that does not use it", logging.ERROR,
                  service=service, variable=variable,
                  fix="move it from secumail.env to .env: compose gives it to the gateway only")


def run_service(name: str, settings: Settings, make_service: Callable[[], Service]) -> None:
    """The body of every service's `main()`: logging, metrics listener, run until signalled."""
    setup_logging(settings.log_level, settings.log_format)
    warn_misplaced_secrets(name)
    tracking.EVENTS.configure(settings.tracking_buffer, settings.tracking)
    log_event(log, "starting", service=name, metrics=str(settings.metrics_listen))

    async def main() -> None:
        metrics = await start_metrics_listener(
            settings.metrics_listen, settings.tracking_readers, settings.request_timeout)
        try:
            await serve_until_signalled(make_service(), settings.drain_timeout)
        finally:
            if metrics is not None:
                metrics.close()  # after the drain: it is watched while the service drains

    # uvloop: the event loop in C; the services spend much of their time in socket I/O.
    uvloop.run(main())
