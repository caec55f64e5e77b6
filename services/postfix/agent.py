"""The Postfix container's HTTP agent: its metrics and the probe mailbox, on the metrics
listener (9100), in a process of its own that never runs as root.

The supervisor (PID 1) must stay root to run Postfix; what faces the network is this child,
started as the owner of the mailboxes (it reads and removes the gateway's canaries in the
probe mailbox). Queue sizes and log counts need root's view, so the child asks the
supervisor for the metrics text over a private socket pair (`MetricsChannel`): one byte
asks, a length and the exposition answer.

Each connection gets one request, answered with `Connection: close`: a request not read
whole within SECUMAIL_REQUEST_TIMEOUT is dropped, and connections over 64 are closed at
once (secumail/protocols/http.py).

    python -m services.postfix.agent FD MAILBOX_BASE    (started by exporter.AgentKeeper)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
import time

from secumail.access import AllowedClients
from secumail.logs import log_event, setup_logging
from secumail.metrics import BAD_CURSOR, METRICS_TYPE, NOT_A_READER, events_cursor, may_read_events
from secumail.protocols.http import NOT_FOUND, Answer, OneShotServer, Request
from secumail.settings import Settings, load_settings
from services.postfix.exporter import AFTER, ASK_EVENTS, TOKEN, ProbeMailbox, probe_maildir

log = logging.getLogger("secumail.postfix.agent")

LENGTH = struct.Struct(">I")
ASK = b"m"


class MetricsChannel:
    """The child's end of the socket pair: the supervisor's metrics on demand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()  # one question at a time on the one channel

    async def metrics(self) -> bytes:
        return await self._ask(ASK)

    async def events(self, after: int) -> bytes:
        """The supervisor's tracking events numbered above `after`, as JSON."""
        return await self._ask(ASK_EVENTS + AFTER.pack(after))

    async def _ask(self, question: bytes) -> bytes:
        async with self.lock:
            self.writer.write(question)
            (length,) = LENGTH.unpack(await self.reader.readexactly(LENGTH.size))
            return await self.reader.readexactly(length)


class Agent:
    def __init__(self, settings: Settings, channel: MetricsChannel, mailbox: ProbeMailbox
                 ) -> None:
        self.settings = settings
        self.channel = channel
        self.mailbox = mailbox
        self.readers = AllowedClients(settings.tracking_readers)

    async def answer(self, request: Request) -> Answer:
        if request.method == "GET" and request.path == "/metrics":
            return Answer("200 OK", await self.channel.metrics(), METRICS_TYPE)
        if request.method == "GET" and request.path == "/events":
            if not await may_read_events(self.readers, request):
                return NOT_A_READER
            after = events_cursor(request)
            return BAD_CURSOR if after is None else \
                Answer("200 OK", await self.channel.events(after))
        prefix, _, token = request.path.partition("/probe/")
        if prefix or not TOKEN.match(token) or request.method not in ("GET", "DELETE"):
            return NOT_FOUND
        if request.method == "DELETE":
            removed = await asyncio.to_thread(self.mailbox.remove, token)
            return Answer("204 No Content" if removed else "404 Not Found", b"")
        await asyncio.to_thread(self.mailbox.purge_stale, time.time())
        found = await asyncio.to_thread(self.mailbox.headers, token)
        if found is None:
            return Answer("404 Not Found", b'{"detail": "no canary with that token"}')
        return Answer("200 OK", json.dumps(found).encode())


async def serve(settings: Settings, channel_fd: int, mailbox: ProbeMailbox) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=channel_fd))
    agent = Agent(settings, MetricsChannel(reader, writer), mailbox)
    server = await OneShotServer(agent.answer, settings.request_timeout).listen(
        settings.metrics_listen)
    log_event(log, "listening", listen=str(settings.metrics_listen))
    # The supervisor gone (it stops this process first, unless it was killed), this one has
    # no use: checked every second.
    supervisor, orphaned = os.getppid(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def check_parent() -> None:
        if os.getppid() != supervisor:
            orphaned.set()
        else:
            loop.call_later(1, check_parent)

    check_parent()
    async with server:
        await orphaned.wait()


def main() -> None:
    """`python -m services.postfix.agent CHANNEL_FD MAILBOX_BASE`"""
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    mailbox = ProbeMailbox(probe_maildir(settings, sys.argv[2]))
    asyncio.run(serve(settings, int(sys.argv[1]), mailbox))


if __name__ == "__main__":
    main()
