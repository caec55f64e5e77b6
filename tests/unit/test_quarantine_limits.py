"""The quarantine's bounds (issue 30): messages, bytes, age; plain files, no sockets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from secumail.quarantine import Quarantine, QuarantineFull, QuarantineLimits


class Envelope:
    def __init__(self) -> None:
        self.mail_from = "a@x.test"
        self.rcpt_tos = ("b@y.test",)
        self.client: dict[str, str] = {}


def quarantine(tmp_path: Path, clock: list[float], **limits: float) -> Quarantine:
    values = {"max_bytes": 10_000, "max_messages": 3, "max_age": 86400.0, **limits}
    kept = Quarantine(str(tmp_path), QuarantineLimits(**values),  # type: ignore[arg-type]
                      clock=lambda: clock[0])
    kept.RECOUNT_SECONDS = 0  # count every time: what several replicas see
    return kept


def test_messages_and_bytes_are_bounded(tmp_path: Path) -> None:
    clock = [time.time()]
    kept = quarantine(tmp_path, clock)
    for _ in range(3):
        kept.store("clamav", Envelope(), b"x" * 100, "virus", "v")
    with pytest.raises(QuarantineFull, match="3 messages"):
        kept.store("spamd", Envelope(), b"x", "spam", "s")
    roomy = quarantine(tmp_path / "b", clock, max_messages=100)
    roomy.store("clamav", Envelope(), b"x" * 6000, "virus", "v")
    with pytest.raises(QuarantineFull, match="6000 bytes"):
        roomy.store("clamav", Envelope(), b"x" * 5000, "virus", "v")
    assert roomy.usage() == (1, 6000)


def test_old_messages_make_room_and_lost_acks_are_not_counted(tmp_path: Path) -> None:
    clock = [time.time()]
    kept = quarantine(tmp_path, clock, max_age=3600)
    (tmp_path / "lost-acks").mkdir()
    (tmp_path / "lost-acks" / "a.eml").write_bytes(b"y" * 50_000)  # not the quarantine's
    old = [kept.store("clamav", Envelope(), b"x", "virus", "v") for _ in range(3)]
    # The ids carry the real time; an hour and a second later, they are too old.
    clock[0] += 3601
    kept.store("clamav", Envelope(), b"x", "virus", "v")
    assert all(kept.record(ident) is None for ident in old)
    assert kept.usage() == (1, 1)
    assert (tmp_path / "lost-acks" / "a.eml").exists()


def test_no_limits_keeps_everything(tmp_path: Path) -> None:
    kept = Quarantine(str(tmp_path))
    for _ in range(5):
        kept.store("clamav", Envelope(), b"x", "virus", "v")
    assert kept.usage() == (5, 5)
