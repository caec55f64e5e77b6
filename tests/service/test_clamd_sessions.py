"""The clamd client's kept IDSESSION connections, against an in-process stand-in for clamd
(the service tests use the real clamd): reuse, a connection clamd ended, answers out of turn.
(Over loopback, against small servers of the test's own.)"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from secumail.backend import BackendError
from secumail.protocols.clamd import Clamd, ScanResult


class FakeClamd:
    """Counts connections; ends each session after `scans_per_session` scans, the way clamd
    ends idle ones; `prefix` replaces the reply's request number when set."""

    def __init__(
        self, scans_per_session: int = 1000, prefix: bytes | None = None, silent: bool = False
    ) -> None:
        self.scans_per_session = scans_per_session
        self.prefix = prefix
        self.silent = silent  # reads the scans, never answers
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.handlers: list[asyncio.Task[None]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        assert await reader.readuntil(b"\0") == b"zIDSESSION\0"
        for number in range(1, self.scans_per_session + 1):
            try:
                assert await reader.readuntil(b"\0") == b"zINSTREAM\0"
                body = b""
                while size := struct.unpack(">I", await reader.readexactly(4))[0]:
                    body += await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                break
            if self.silent:
                continue
            verdict = b"Eicar FOUND" if b"EICAR" in body else b"OK"
            writer.write((self.prefix or str(number).encode()) + b": stream: " + verdict + b"\0")
        writer.close()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


class World:
    """The fake clamds and the clients of one test, all closed after it."""

    def __init__(self) -> None:
        self.fakes: list[FakeClamd] = []
        self.clients: list[Clamd] = []

    async def clamd(self, **behaviour: Any) -> FakeClamd:
        fake = FakeClamd(**behaviour)
        fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        self.fakes.append(fake)
        return fake

    def client(self, fake: FakeClamd, max_length: int = 1 << 20, timeout: float = 5) -> Clamd:
        self.clients.append(Clamd(fake.address, timeout, max_length))
        return self.clients[-1]

    async def close(self) -> None:
        for clamd in self.clients:
            clamd.close()
        for fake in self.fakes:
            assert fake.server is not None
            fake.server.close()
            await fake.server.wait_closed()
            await asyncio.wait_for(asyncio.gather(*fake.handlers), 5)  # they see the clients go


@pytest.fixture
async def world() -> AsyncIterator[World]:
    made = World()
    yield made
    await made.close()


async def test_scans_share_one_connection(world: World) -> None:
    fake = await world.clamd()
    clamd = world.client(fake)
    results = [await clamd.scan(b"message %d" % n) for n in range(5)]
    assert results == [ScanResult(False)] * 5
    assert await clamd.scan(b"EICAR") == ScanResult(True, "Eicar")
    assert fake.connections == 1


async def test_a_session_clamd_ended_is_replaced_without_an_error(world: World) -> None:
    fake = await world.clamd(scans_per_session=2)
    clamd = world.client(fake)
    for _ in range(5):
        assert await clamd.scan(b"message") == ScanResult(False)
    assert fake.connections == 3


async def test_an_answer_out_of_turn_is_never_taken_for_a_verdict(world: World) -> None:
    fake = await world.clamd(prefix=b"7")
    clamd = world.client(fake)
    with pytest.raises(BackendError, match="out of turn"):
        await clamd.scan(b"message")


async def test_no_answer_in_time_is_a_backend_error_and_the_session_goes(world: World) -> None:
    fake = await world.clamd(silent=True)
    clamd = world.client(fake, timeout=0.3)
    with pytest.raises(BackendError, match="TimeoutError"):
        await clamd.scan(b"message")
    assert clamd.kept.idle == []


async def test_clamd_gone_is_a_backend_error(world: World) -> None:
    fake = await world.clamd()
    clamd = world.client(fake)
    await clamd.scan(b"message")
    assert fake.server is not None
    fake.server.close()
    await fake.server.wait_closed()
    for _, session in clamd.kept.idle:
        session.writer.transport.abort()  # what clamd's exit does to the kept connection
    with pytest.raises(BackendError, match="clamd at"):
        await clamd.scan(b"message")


async def test_too_big_for_clamd_is_refused_before_sending(world: World) -> None:
    fake = await world.clamd()
    clamd = world.client(fake, max_length=10)
    with pytest.raises(BackendError, match="StreamMaxLength"):
        await clamd.scan(b"x" * 11)
    assert fake.connections == 0
