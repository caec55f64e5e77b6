"""Deliveries whose 250 was lost (secumail/lostacks.py): records, without sockets."""

from __future__ import annotations

import os
import time
from pathlib import Path

from secumail.lostacks import STILL_AWAITED, LostAcks, message_key

FIRST = b"Received: from a by mx; Mon, 1 Dec 2026 10:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n"
RETRY = b"Received: from a by mx; Mon, 1 Dec 2026 10:00:07 +0000\r\nSubject: x\r\n\r\nbody\r\n"


def test_the_same_message_is_the_same_key_whatever_its_hops_wrote_on_top() -> None:
    key = message_key("id@x", "a@x", ["b@y", "c@y"], FIRST)
    assert key == message_key("id@x", "a@x", ["c@y", "b@y"], RETRY)  # order of recipients too
    assert key != message_key("other@x", "a@x", ["b@y", "c@y"], FIRST)
    assert key != message_key("id@x", "a@x", ["b@y"], FIRST)
    assert key != message_key("id@x", "a@x", ["b@y", "c@y"], FIRST.replace(b"body", b"bod2"))


def test_a_record_is_taken_once(tmp_path: Path) -> None:
    acks = LostAcks(tmp_path / "lost-acks")
    assert not acks.pending() and acks.take("k") is None  # no directory yet
    acks.record("k", "250 2.0.0 Ok: queued as ABC")
    assert acks.pending()
    other = LostAcks(tmp_path / "lost-acks")  # another replica, the same volume
    assert other.take("k") == "250 2.0.0 Ok: queued as ABC"
    assert acks.take("k") is None and not acks.pending()


def test_records_expire(tmp_path: Path) -> None:
    acks = LostAcks(tmp_path, ttl=60)
    acks.record("old", "250 ok")
    stale = time.time() - 120
    os.utime(tmp_path / "old.delivered", (stale, stale))
    assert not acks.pending()
    assert not (tmp_path / "old.delivered").exists()


def test_a_retry_waits_while_the_first_copy_is_awaited(tmp_path: Path) -> None:
    acks = LostAcks(tmp_path)
    acks.await_answer("k")
    assert acks.pending()
    assert acks.take("k") == STILL_AWAITED and acks.take("k") == STILL_AWAITED  # not taken
    acks.record("k", "250 ok")  # the first copy was delivered
    assert acks.take("k") == "250 ok" and acks.take("k") is None
    acks.await_answer("j")
    acks.forget("j")  # the next hop refused it: the retry is a message like any
    assert acks.take("j") is None and not acks.pending()
    acks.await_answer("old")
    stale = time.time() - 3600
    os.utime(tmp_path / "old.awaited", (stale, stale))  # a replica died meanwhile
    assert acks.take("old") is None and not acks.pending()
