"""The metrics listeners' HTTP, on the service's own event loop: the services' /metrics and
/events (secumail/metrics.py) and the Postfix container's agent (services/postfix/agent.py).

One request per connection, answered with `Connection: close`: a request head not read
whole within `timeout` is dropped, one over HTTP_REQUEST_HEAD is dropped, and connections
over `max_connections` are closed at once. No thread: the listener it replaced (wsgiref,
a thread per connection) kept an idle connection, and its thread, for ever, and a thread
beside a busy event loop takes the GIL from it at each of its own system calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import parse_qs

from secumail.limits import HTTP_CONNECTIONS, HTTP_REQUEST_HEAD
from secumail.logs import log_event
from secumail.netaddr import HostPort, peer_name

log = logging.getLogger("secumail.http")

JSON = "application/json"


class Request(NamedTuple):
    method: str  # "" when the request line is not one
    path: str
    query: str
    peer: str  # the client's address, "" when unknown

    def parameter(self, name: str, default: str = "") -> str:
        return parse_qs(self.query).get(name, [default])[0]


class Answer(NamedTuple):
    status: str  # "200 OK"
    body: bytes
    content_type: str = JSON


Answerer = Callable[[Request], Awaitable[Answer]]

NOT_FOUND = Answer("404 Not Found", b'{"detail": "not found"}')


def parse_request(head: bytes, peer: str) -> Request:
    """The request line of a request head (its headers are not needed here)."""
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        return Request("", "", "", peer)
    path, _, query = words[1].partition("?")
    return Request(words[0], path, query, peer)


class OneShotServer:
    """Reads a request head, asks `answer`, writes the answer and closes."""

    def __init__(self, answer: Answerer, timeout: float,
                 max_connections: int = HTTP_CONNECTIONS) -> None:
        self.answer = answer
        self.timeout = timeout
        self.max_connections = max_connections
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        if self.connections >= self.max_connections:
            log_event(log, "connection refused", logging.WARNING, peer=peer_name(peername),
                      reason="too many connections")
            writer.close()
            return
        self.connections += 1
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                answer = await self.answer(parse_request(
                    head, peername[0] if isinstance(peername, tuple) else ""))
                writer.write(
                    f"HTTP/1.1 {answer.status}\r\nContent-Type: {answer.content_type}\r\n"
                    f"Content-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n".encode()
                    + answer.body)
                await writer.drain()
        except TimeoutError:
            log_event(log, "connection dropped", logging.WARNING, peer=peer_name(peername),
                      reason=f"no answer within {self.timeout:g} s")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ConnectionError):
            pass  # junk, an endless header or a client that left: nothing to answer
        finally:
            self.connections -= 1
            writer.close()

    async def listen(self, listen: HostPort) -> asyncio.Server:
        return await asyncio.start_server(self.handle, listen.host, listen.port,
                                          reuse_address=True, limit=HTTP_REQUEST_HEAD)
