"""The relay's quick reading of MAIL and RCPT addresses gives what aiosmtpd's own parser
gives, for plain addresses and for everything else (which it leaves to aiosmtpd)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from secumail.relay import PLAIN_ADDRESS, RelaySMTP


class _Limits:
    """Only what _getaddr reads of the server."""

    def __init__(self, local_part_limit: int = 0) -> None:
        self.local_part_limit = local_part_limit


def both(arg: str, limit: int = 0) -> tuple[object, object]:
    server = _Limits(limit)
    return (outcome(RelaySMTP._getaddr, server, arg),
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
