"""What the filter's aiosmtpd adapter relies on in aiosmtpd, pinned: an aiosmtpd upgrade that
changes any of it fails here. And the adapter's quick reading of MAIL and RCPT addresses
gives what aiosmtpd's own parser gives, for plain addresses and for everything else (which
it leaves to aiosmtpd)."""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from secumail.filter.aiosmtpd_adapter import PLAIN_ADDRESS, FilterSMTP
from secumail.filter.session import Filter
from secumail.filter.verdicts import Verdict
from secumail.netaddr import HostPort
from secumail.protocols.smtp import Envelope
from secumail.quarantine import Quarantine

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "secumail" / "filter"


class _Limits:
    """Only what _getaddr reads of the server."""

    def __init__(self, local_part_limit: int = 0) -> None:
        self.local_part_limit = local_part_limit


def both(arg: str, limit: int = 0) -> tuple[object, object]:
    server = _Limits(limit)
    return (outcome(FilterSMTP._getaddr, server, arg),
            outcome(SMTP._getaddr, server, arg))


def outcome(parse: Callable[..., object], server: _Limits, arg: str) -> object:
    """What the parser returns, or the exception it raises (aiosmtpd's does, on "<")."""
    try:
        return parse(server, arg)
    except Exception as error:
        return type(error)


@pytest.mark.parametrize("arg", [
    "<alice@secumail.test>", "<alice@secumail.test> SIZE=2048 BODY=8BITMIME",
    "<a.b+tag@x-y.example>SIZE=1", " <a@b>", "<>", "<> BODY=8BITMIME", "a@b", "<a@b",
    '<"quoted local"@b.test>', "<@route:a@b.test>", "<a@[192.0.2.1]>", "<a@b.>", "<a..b@c>",
    "<a@b>>", "<user%foreign@secumail.test>",
])
def test_same_reading_as_aiosmtpd(arg: str) -> None:
    ours, theirs = both(arg)
    assert ours == theirs


def test_plain_addresses_take_the_quick_path() -> None:
    assert PLAIN_ADDRESS.match("<alice@secumail.test> SIZE=10")
    assert not PLAIN_ADDRESS.match('<"a b"@secumail.test>')


def test_the_local_part_limit_still_holds() -> None:
    ours, theirs = both("<" + "a" * 70 + "@b.test>", limit=64)
    assert ours == theirs == (None, None)


@settings(deadline=None)  # 100 examples; 3,000 with HYPOTHESIS_PROFILE=fuzz
@given(st.text(alphabet="<>@.\"a-+ :[]()\\=Z9%!\t", max_size=30))
def test_any_argument_is_read_as_aiosmtpd_reads_it(arg: str) -> None:
    ours, theirs = both(arg)
    assert ours == theirs


# --- the aiosmtpd members the adapter uses (secumail/filter/aiosmtpd_adapter.py) -------------

def test_aiosmtpd_is_the_version_the_adapter_was_checked_against() -> None:
    """pyproject.toml pins it: an upgrade is that one line, and this file's tests."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"aiosmtpd=={aiosmtpd.__version__}" in project["dependencies"]


def test_the_private_members_the_adapter_calls_are_there_and_do_what_it_expects() -> None:
    # The client check runs before the greeting, in place of _handle_client.
    assert inspect.iscoroutinefunction(SMTP._handle_client)
    # MAIL FROM: and RCPT TO: are read with _strip_command_keyword, then _getaddr.
    server = object.__new__(SMTP)
    assert SMTP._strip_command_keyword(server, "FROM:", "FROM:<a@b.test> SIZE=1") == \
        "<a@b.test> SIZE=1"
    assert SMTP._strip_command_keyword(server, "TO:", "FROM:<a@b.test>") is None
    # DATA's pipelined rest goes back into the StreamReader's buffer, ahead of what is there.
    loop = asyncio.new_event_loop()
    try:
        reader = asyncio.StreamReader(loop=loop)
        reader.feed_data(b"QUIT\r\n")
        reader._buffer[:0] = b"RSET\r\n"
        assert bytes(reader._buffer) == b"RSET\r\nQUIT\r\n"
    finally:
        loop.close()


def test_aiosmtpd_finds_the_adapters_commands_and_hooks() -> None:
    """aiosmtpd looks them up with dir() on each new connection; the adapter lists them once
    per class (_HooksListedOnce): every command of ours and aiosmtpd's must still be found."""
    async def inspect_nothing(envelope: Envelope, message: bytes) -> Verdict:
        return Verdict("deliver", "clean")

    filter = Filter("clamav", HostPort("127.0.0.1", 1), inspect_nothing, "mx.test", 1.0,
                    Quarantine(Path("/nonexistent")), 1)
    loop = asyncio.new_event_loop()
    try:
        server = FilterSMTP(filter, hostname="mx.test", loop=loop)
    finally:
        loop.close()
    assert {"MAIL", "RCPT", "DATA", "XFORWARD", "EHLO", "HELO", "RSET", "NOOP", "QUIT"} <= \
        set(server._smtp_methods)
    assert server._smtp_methods["DATA"] == server.smtp_DATA  # ours, not aiosmtpd's
    assert set(server._handle_hooks) == {"EHLO", "RSET", "exception"}
    assert server._ehlo_hook_ver == "new"  # the cached signature still reads as 5 arguments


def test_only_the_adapter_touches_aiosmtpd_and_the_filter_has_no_type_ignore() -> None:
    for path in sorted(FILTER.glob("*.py")):
        source = path.read_text()
        if path.name != "aiosmtpd_adapter.py":
            assert not re.search(r"^\s*(from|import) aiosmtpd\b", source, re.M), path
        assert "type: ignore" not in source, path


def test_replies_to_pipelined_commands_go_out_in_one_write() -> None:
    """While a whole command waits unread, the reply to MAIL, RCPT or XFORWARD waits for the
    next one's (RFC 2920); the next reply writes them all, in order. Any other reply goes at
    once: a goodbye before the connection closes is never held back."""
    async def inspect_nothing(envelope: Envelope, message: bytes) -> Verdict:
        return Verdict("deliver", "clean")

    class Writer:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        async def drain(self) -> None:
            return None

    filter = Filter("clamav", HostPort("127.0.0.1", 1), inspect_nothing, "mx.test", 1.0,
                    Quarantine(Path("/nonexistent")), 1)
    loop = asyncio.new_event_loop()
    try:
        server = FilterSMTP(filter, hostname="mx.test", loop=loop)
        writer = Writer()
        server._reader, server._writer = asyncio.StreamReader(loop=loop), writer  # type: ignore[assignment]
        server._reader.feed_data(b"RCPT TO:<b@c.test>\r\nDATA\r\n")
        loop.run_until_complete(server._reply("250 2.1.0 Ok", pipelined=True))  # MAIL's
        assert writer.writes == []  # RCPT is waiting
        del server._reader._buffer[:len(b"RCPT TO:<b@c.test>\r\n")]  # DATA is waiting
        loop.run_until_complete(server._reply("250 2.1.5 Ok", pipelined=True))
        assert writer.writes == []
        del server._reader._buffer[:]
        loop.run_until_complete(server.push("354 End data with <CR><LF>.<CR><LF>"))
        server._reader.feed_data(b"partial line, no end yet")
        loop.run_until_complete(server._reply(b"250 2.1.0 Ok", pipelined=True))  # now
        server._reader.feed_data(b"\r\nNOOP\r\n")
        loop.run_until_complete(server.push("221 Bye"))  # never held
    finally:
        loop.close()
    assert writer.writes == [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with "
                             b"<CR><LF>.<CR><LF>\r\n", b"250 2.1.0 Ok\r\n", b"221 Bye\r\n"]
