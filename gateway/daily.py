"""Rounds the gateway runs once a day at a set time (UTC): the users' quarantine digests,
our DMARC aggregate reports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from secumail.logs import log_event

log = logging.getLogger("secumail.gateway")
DAY = 86400


def seconds_to(at: float, now: float) -> float:
    """Until the next `at` seconds after midnight UTC (a whole day when it is now)."""
    moment = now - now % DAY + at
    return (moment if moment > now else moment + DAY) - now


async def every_day(at: Callable[[], float], run: Callable[[], Awaitable[object]],
                    clock: Callable[[], float], what: str) -> None:
    """`run` at `at()` seconds after midnight UTC each day; a round that fails is said in
    the log (a bad volume, the next hop down) and the next one comes tomorrow."""
    while True:
        await asyncio.sleep(seconds_to(at(), clock()))
        try:
            await run()
        except Exception as error:
            log_event(log, f"{what} round failed", logging.WARNING,
                      error=f"{type(error).__name__}: {error}")
