"""The Postfix container's HTTP agent: its metrics and the probe mailbox, on the metrics
listener (9100), in a process of its own that never runs as root.

The supervisor (PID 1) must stay root to run Postfix; what faces the network is this child,
started as the owner of the mailboxes (it reads and removes the gateway's canaries in the
probe mailbox). Queue sizes and log counts need root's view, so the child asks the
supervisor for the metrics text over a private socket pair (`MetricsChannel`): one byte
asks, a length and the exposition answer.

Each connection gets one request, answered with `Connection: close`: a request not read
whole within SECUMAIL_REQUEST_TIMEOUT is dropped, and connections over MAX_CONNECTIONS are
closed at once.

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
from urllib.parse import parse_qs

from secumail.access import AllowedClients
from secumail.logs import log_event, setup_logging
from secumail.netaddr import peer_name
from secumail.settings import Settings, load_settings
from services.postfix.exporter import AFTER, ASK_EVENTS, TOKEN, ProbeMailbox, probe_maildir

log = logging.getLogger("secumail.postfix.agent")

MAX_CONNECTIONS = 64
MAX_REQUEST_HEAD = 8192
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
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_text = peer_name(writer.get_extra_info("peername"))
        if self.connections >= MAX_CONNECTIONS:
            log_event(log, "connection refused", logging.WARNING, peer=peer_text,
                      reason="too many connections")
            writer.close()
            return
        self.connections += 1
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                peername = writer.get_extra_info("peername")
                status, body, content_type = await self.answer(
                    head, peername[0] if isinstance(peername, tuple) else "")
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                await writer.drain()
        except TimeoutError:
            log_event(log, "connection dropped", logging.WARNING, peer=peer_text,
                      reason=f"no answer within {self.settings.request_timeout:g} s")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ConnectionError):
            pass  # junk, an endless header or a client that left: nothing to answer
        finally:
            self.connections -= 1
            writer.close()

    async def answer(self, head: bytes, peer: str = "") -> tuple[str, bytes, str]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        method, path = (request_line[0], request_line[1]) if len(request_line) == 3 else ("", "")
        if method == "GET" and path.split("?")[0] == "/metrics":
            return "200 OK", await self.channel.metrics(), "text/plain; version=0.0.4"
        if method == "GET" and path.split("?")[0] == "/events":
            if not await self.readers.allows(peer):
                log_event(log, "events refused", logging.WARNING, peer=peer,
                          readers=str(self.readers))
                return "403 Forbidden", b'{"detail": "only SECUMAIL_TRACKING_READERS may ' \
                    b'read events"}', "application/json"
            after = parse_qs(path.partition("?")[2]).get("after", ["0"])[0]
            if not after.isdigit() or int(after) >= 2**64:
                return "400 Bad Request", b'{"detail": "after must be a number"}', \
                    "application/json"
            return "200 OK", await self.channel.events(int(after)), "application/json"
        prefix, _, token = path.partition("/probe/")
        if prefix or not TOKEN.match(token) or method not in ("GET", "DELETE"):
            return "404 Not Found", b'{"detail": "not found"}', "application/json"
        if method == "DELETE":
            removed = await asyncio.to_thread(self.mailbox.remove, token)
            return ("204 No Content" if removed else "404 Not Found"), b"", "application/json"
        await asyncio.to_thread(self.mailbox.purge_stale, time.time())
        found = await asyncio.to_thread(self.mailbox.headers, token)
        if found is None:
            return "404 Not Found", b'{"detail": "no canary with that token"}', \
                "application/json"
        return "200 OK", json.dumps(found).encode(), "application/json"


async def serve(settings: Settings, channel_fd: int, mailbox: ProbeMailbox) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=channel_fd))
    agent = Agent(settings, MetricsChannel(reader, writer), mailbox)
    server = await asyncio.start_server(
        agent.handle, settings.metrics_listen.host, settings.metrics_listen.port,
        reuse_address=True, limit=MAX_REQUEST_HEAD)
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
