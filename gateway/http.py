"""uvicorn's HTTP/1.1 protocol with a deadline for every request, and the Host check.

uvicorn times out idle keep-alive connections, but a connection that never completes a
request (idle sockets, a slowloris trickle, on the first request or any later one of a kept
connection: uvicorn's keep-alive timer stops at the first byte) stays open forever: a few
thousand of them and the gateway runs out of descriptors. This one drops them, with a log
line, when a request is not received whole (headers and body) within
SECUMAIL_GATEWAY_REQUEST_TIMEOUT seconds of the connection or of the previous answer.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from secumail.logs import log_event
from secumail.netaddr import parse_ip

log = logging.getLogger("secumail.gateway")


class DeadlineH11Protocol(H11Protocol):
    request_timeout = 10.0  # set from the settings by gateway.main

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_cycle: object = None  # the request cycle when the deadline was set

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request of a kept connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._armed_cycle = self.cycle
        self._deadline = self.loop.call_later(self.request_timeout, self._drop_if_no_request)

    def _drop_if_no_request(self) -> None:
        # uvicorn makes a new `cycle` once a request's headers are complete; `more_body`
        # stays set until its body is in. A request being answered is not timed here.
        cycle = self.cycle
        unfinished = cycle is None or cycle is self._armed_cycle or cycle.more_body
        if unfinished and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log_event(
                log, "connection dropped", logging.WARNING, peer=client,
                reason=f"no complete request within {self.request_timeout:g} s",
            )
            self.transport.close()


class HostCheck:
    """Refuses (400) a request whose Host header is a name this gateway does not go by.

    DNS rebinding: a page on attacker.example makes its name resolve to 127.0.0.1, and the
    admin's own browser then reads the gateway (health, metrics without a token) for it;
    those requests say `Host: attacker.example`. Addresses (`127.0.0.1:8080`, `[::1]`) are
    always fine: no page can make a browser send one for another site.
    """

    def __init__(self, app: ASGIApp, names: list[str]) -> None:
        self.app = app
        self.names = {name.lower().rstrip(".") for name in names}

    def allows(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name.startswith("[") and "]" in name:  # [v6] or [v6]:port
            name = name[1:name.index("]")]
        name = name.lower().rstrip(".")
        return parse_ip(name) is not None or name in self.names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allows(host):
                client = scope.get("client")
                log_event(log, "request refused", logging.WARNING, host=host[:100] or "none",
                          reason="Host is not a name of this gateway (SECUMAIL_GATEWAY_HOSTS)",
                          client=client[0] if client else "?")
                await PlainTextResponse("Invalid host header", 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
