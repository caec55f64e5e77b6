"""uvicorn's HTTP/1.1 protocol with a deadline for the first request.

uvicorn times out idle keep-alive connections, but a connection that never completes its
first request's headers (idle sockets, a slowloris trickle) stays open forever: a few
thousand of them and the gateway runs out of descriptors. This one drops them, with a log
line, after SECUMAIL_GATEWAY_REQUEST_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from secumail.logs import log_event

log = logging.getLogger("secumail.gateway")


class DeadlineH11Protocol(H11Protocol):
    request_timeout = 10.0  # set from the settings by gateway.main

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.request_timeout, self._drop_if_no_request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _drop_if_no_request(self) -> None:
        # `cycle` is set once a request's headers are complete, and stays set afterwards
        # (keep-alive idleness is uvicorn's own timeout_keep_alive).
        if self.cycle is None and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log_event(
                log, "connection dropped", logging.WARNING, peer=client,
                reason=f"no complete request within {self.request_timeout:g} s",
            )
            self.transport.close()
