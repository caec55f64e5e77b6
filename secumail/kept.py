"""Connections kept between uses, as Postfix's connection cache keeps them: the filters'
next-hop SMTP connections and the clamav filter's clamd sessions."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

Connection = TypeVar("Connection")


class KeptConnections(Generic[Connection]):
    """Idle connections, the most recently used first. One idle for `idle_seconds` or more,
    or that `usable` turns down, is closed when met; beyond `most`, one is closed at once."""

    def __init__(
        self, idle_seconds: float, most: int, close: Callable[[Connection], object]
    ) -> None:
        self.idle_seconds = idle_seconds
        self.most = most
        self.close = close
        self.idle: list[tuple[float, Connection]] = []

    def take(self, usable: Callable[[Connection], bool] = lambda _: True) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            since, connection = self.idle.pop()
            if now - since < self.idle_seconds and usable(connection):
                return connection
            self.close(connection)
        return None

    def keep(self, connection: Connection) -> None:
        if len(self.idle) < self.most:
            self.idle.append((time.monotonic(), connection))
        else:
            self.close(connection)

    def close_all(self) -> None:
        while self.idle:
            self.close(self.idle.pop()[1])
