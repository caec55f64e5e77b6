"""Kept connections: the most recent first, none too long idle, none turned down, few."""

from __future__ import annotations

import time

import pytest

from secumail.kept import KeptConnections


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the clock the module reads
    return now


def test_the_most_recent_comes_back_first(clock: list[float]) -> None:
    closed: list[str] = []
    kept = KeptConnections[str](2.0, 10, closed.append)
    kept.keep("a")
    kept.keep("b")
    assert kept.take() == "b"
    assert kept.take() == "a"
    assert kept.take() is None
    assert closed == []


def test_too_long_idle_or_turned_down_is_closed(clock: list[float]) -> None:
    closed: list[str] = []
    kept = KeptConnections[str](2.0, 10, closed.append)
    kept.keep("old")
    clock[0] += 2.5
    kept.keep("broken")
    kept.keep("fresh")
    assert kept.take(lambda connection: connection != "broken") == "fresh"
    assert kept.take(lambda connection: connection != "broken") is None
    assert closed == ["broken", "old"]


def test_beyond_the_most_it_closes_and_close_all_empties(clock: list[float]) -> None:
    closed: list[str] = []
    kept = KeptConnections[str](2.0, 2, closed.append)
    for name in ("a", "b", "c"):
        kept.keep(name)
    assert closed == ["c"]
    kept.close_all()
    assert sorted(closed) == ["a", "b", "c"]
    assert kept.take() is None
