"""When the filters' SMTP client may hand its connection to another session: never with a
reply still to come (it would be read as the answer to the next session's command).
(Over loopback, against small servers of the test's own.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from secumail.netaddr import HostPort
from secumail.protocols.smtp import NextHop, SmtpClient, SmtpUnavailable


class SlowNextHop:
    """Answers the greeting and EHLO at once, and MAIL only once `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 next.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-next.test\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                await self.release.wait()
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()


async def connected(address: NextHop, timeout: float = 5) -> SmtpClient:
    client = SmtpClient(timeout)
    assert (await client.connect(address, "filter.test")).code == 250
    return client


@pytest.fixture
async def next_hop() -> AsyncIterator[tuple[SlowNextHop, NextHop]]:
    hop = SlowNextHop()
    server = await asyncio.start_server(hop.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield hop, NextHop(HostPort("127.0.0.1", port))
    hop.release.set()
    server.close()
    await server.wait_closed()


async def test_between_transactions_it_is_reusable(
    next_hop: tuple[SlowNextHop, NextHop],
) -> None:
    hop, address = next_hop
    hop.release.set()
    client = await connected(address)
    assert client.reusable
    assert (await client.command("MAIL FROM:<a@b.test>")).code == 250
    assert not client.reusable  # a transaction is open
    assert (await client.command("RSET")).code == 250
    assert client.reusable
    await client.quit()
    assert not client.reusable


async def test_a_command_cut_short_leaves_it_unfit(
    next_hop: tuple[SlowNextHop, NextHop],
) -> None:
    _, address = next_hop
    client = await connected(address)
    pending = asyncio.ensure_future(client.command("MAIL FROM:<a@b.test>"))
    await asyncio.sleep(0.05)
    pending.cancel()  # what the end of the upstream session does to its handler
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert client.connected
    assert not client.reusable
    await client.close()


async def test_a_next_hop_that_does_not_answer_times_out_and_is_dropped(
    next_hop: tuple[SlowNextHop, NextHop],
) -> None:
    _, address = next_hop
    client = await connected(address, 0.3)
    with pytest.raises(SmtpUnavailable, match="MAIL: TimeoutError"):
        await client.command("MAIL FROM:<a@b.test>")  # never answered
    assert not client.connected


async def test_time_between_commands_is_not_a_timeout(
    next_hop: tuple[SlowNextHop, NextHop],
) -> None:
    hop, address = next_hop
    hop.release.set()
    client = await connected(address, 0.3)
    await asyncio.sleep(0.8)  # kept idle for longer than the timeout, as between sessions
    assert client.connected
    assert (await client.command("MAIL FROM:<a@b.test>")).code == 250
    await client.quit()
