"""The connection helpers of secumail.connections over real loopback sockets (in-process)."""

from __future__ import annotations

import asyncio

import pytest

from secumail.connections import ConnectionHandler, IdleDeadline, send


async def serve(handler: ConnectionHandler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_idle_deadline_closes_a_silent_peer_but_not_a_slow_answer() -> None:
    outcome: dict[str, object] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle = IdleDeadline(writer, 0.3)
        try:
            idle.waiting()
            request = await reader.readline()
            idle.busy()
            await asyncio.sleep(0.6)  # work longer than the idle timeout: not idleness
            outcome["closed while busy"] = writer.is_closing()
            await send(writer, b"answer " + request)
            idle.waiting()
            outcome["after"] = await reader.read(100)  # the peer now says nothing
            outcome["expired"] = idle.expired
        finally:
            idle.cancel()

    server, port = await serve(handler)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"question\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"answer question\n"
        assert await asyncio.wait_for(reader.read(100), 10) == b""  # closed for idleness
        writer.close()
    assert outcome == {"closed while busy": False, "after": b"", "expired": True}


async def test_send_refuses_a_connection_that_is_closing() -> None:
    raised: list[BaseException] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send(writer, b"first\n")
        writer.close()
        with pytest.raises(ConnectionResetError) as error:
            await send(writer, b"second\n")
        raised.append(error.value)

    server, port = await serve(handler)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(100), 10) == b"first\n"
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        writer.close()
    assert len(raised) == 1
