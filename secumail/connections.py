"""Connections, as every SecuMail server holds them: how many requests are in flight (so a
drain waits for them), the idle deadline (a peer that keeps us waiting is let go), writing
an answer, the listener with its connection cap and drain, and one read loop for the
request/answer protocols (the policy service's lines, the milter's packets).

Protocol code (decoders, encoders) lives in secumail/protocols/; what a service decides, in
its own folder. runtime.py only starts a service and runs it until it is signalled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from secumail.limits import LINE_LIMIT, WRITE_BUFFER_HIGH
from secumail.logs import log_event
from secumail.netaddr import HostPort, peer_name

log = logging.getLogger("secumail.connections")


class InFlight:
    """Counts units of work in progress so that shutdown can wait for them.

    `with inflight.track():` around each unit. A plain context manager, not a
    @contextmanager generator: the policy service enters it once per request.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def track(self) -> InFlight:
        return self

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class IdleDeadline:
    """Closes a connection whose peer has kept us waiting: `timeout` seconds with nothing
    sent, or `request_timeout` seconds for a request it started and has not finished (a
    request trickled a byte at a time would otherwise hold the connection for ever).

    Call `waiting(mid_request)` before each wait for the peer (a request, a reply) and
    `busy()` after it; one timer per connection checks now and then. This costs a clock
    read per wait, where `asyncio.timeout()` around each read cost as much as parsing a
    policy request. Once `expired` (`reason` says which), the pending read returns b"" (or
    what came before the close).
    """

    def __init__(self, writer: asyncio.StreamWriter, timeout: float,
                 request_timeout: float | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer = writer
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.expired = False
        self.reason = ""
        self._since: float | None = None
        self._request_since: float | None = None
        self._timer_at = self.loop.time() + timeout
        self._timer = self.loop.call_at(self._timer_at, self._check)

    def waiting(self, mid_request: bool = False) -> None:
        self._since = now = self.loop.time()
        if not mid_request:
            self._request_since = None
        elif self._request_since is None:
            self._request_since = now
            if self.request_timeout is not None and now + self.request_timeout < self._timer_at:
                self._schedule(now + self.request_timeout)  # sooner than the next check

    def busy(self) -> None:
        self._since = None

    def cancel(self) -> None:
        self._timer.cancel()

    def _due(self, now: float) -> tuple[float, str]:
        due = (now if self._since is None else self._since) + self.timeout
        reason = f"nothing received for {self.timeout:g} s"
        if self._request_since is not None and self.request_timeout is not None:
            request_due = self._request_since + self.request_timeout
            if request_due < due:
                due = request_due
                reason = f"a request still unfinished after {self.request_timeout:g} s"
        return due, reason

    def _check(self) -> None:
        now = self.loop.time()
        due, reason = self._due(now)
        if self._since is None or now < due:
            self._schedule(max(due, now + 0.01))
            return
        self.expired, self.reason = True, reason
        self.writer.close()

    def _schedule(self, when: float) -> None:
        self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._check)



async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write an answer; wait for the socket only when it is really backed up (a peer that
    does not read). Answers are small and the MTA reads them at once, and drain() on every
    write costs a coroutine for nothing."""
    if writer.is_closing():  # the peer has gone: drain() used to say so, say it here
        raise ConnectionResetError("connection closed by the peer")
    writer.write(data)
    if writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
        await writer.drain()


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ConnectionServer:
    """A TCP listener with a connection cap, for the line and packet protocols.

    Handlers wrap each request in `self.inflight.track()` and stop reading new requests
    once `self.draining` is set; idle connections are closed at drain time. With
    `keep_sessions` (the milter: Postfix does not take a cut milter session up again, every
    message left in it would get 451), a drain waits instead for each connection to be
    ended by its peer, within the drain's timeout.
    """

    def __init__(
        self, name: str, listen: HostPort, handler: ConnectionHandler, max_connections: int,
        keep_sessions: bool = False,
    ) -> None:
        self.name = name
        self.listen = listen
        self.handler = handler
        self.max_connections = max_connections
        self.keep_sessions = keep_sessions
        self.inflight = InFlight()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.listen.host, self.listen.port, reuse_address=True, limit=LINE_LIMIT
        )
        log_event(log, "listening", service=self.name, listen=str(self.listen))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.draining or len(self._tasks) >= self.max_connections:
            log_event(
                log, "connection refused", logging.WARNING, service=self.name,
                peer=peer_name(writer.get_extra_info("peername")),
                reason="draining" if self.draining else "too many connections",
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def drain(self, timeout: float) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self.keep_sessions and self._tasks:
            _, left = await asyncio.wait(list(self._tasks), timeout=timeout)
            if left:
                log_event(log, "drain timed out: sessions cut", logging.WARNING,
                          service=self.name, sessions=len(left))
        elif not await self.inflight.wait_idle(timeout):
            log_event(log, "drain timed out", logging.WARNING, in_flight=self.inflight.count)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)


async def read_loop(reader: asyncio.StreamReader, idle: IdleDeadline, read_size: int,
                    received: Callable[[bytes], Awaitable[bool]], *,
                    mid_request: Callable[[], bool], idle_out: Callable[[str], None],
                    ended: Callable[[], None], stop: Callable[[], bool] = lambda: False
                    ) -> None:
    """Read one connection until its peer leaves (`ended()`), keeps us waiting past the
    idle deadline (`idle_out(reason)`), `stop()` says so before a read (a draining
    server, between requests), or `received(data)` says False (it hung up). The deadline
    is cancelled on the way out, whatever ended it."""
    try:
        while not stop():
            idle.waiting(mid_request())
            data = await reader.read(read_size)
            idle.busy()
            if idle.expired:
                idle_out(idle.reason)
                return
            if not data:
                ended()
                return
            if not await received(data):
                return
    finally:
        idle.cancel()
