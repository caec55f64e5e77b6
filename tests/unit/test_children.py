"""The supervisor's child keeper (services/postfix/children.py): a helper that ends is
started again, a stopped keeper starts nothing more."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.postfix.children import CommandKeeper


def test_a_child_that_ends_is_started_again_until_the_keeper_stops(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    keeper = CommandKeeper(
        "counter", [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x')"], user=None)
    keeper.RESTART_AFTER = 0.05
    keeper.start()
    deadline = time.monotonic() + 10
    while (len(runs.read_text()) if runs.exists() else 0) < 3:
        assert time.monotonic() < deadline, "the child was not started again"
        time.sleep(0.05)
    keeper.stop()
    time.sleep(0.3)
    settled = len(runs.read_text())
    time.sleep(0.3)
    assert len(runs.read_text()) == settled


def test_a_command_that_cannot_start_is_tried_again_not_fatal(tmp_path: Path) -> None:
    keeper = CommandKeeper("missing", [str(tmp_path / "no-such-program")], user=None)
    keeper.RESTART_AFTER = 0.05
    keeper.start()
    time.sleep(0.3)
    assert keeper.child is None and keeper.thread.is_alive()  # failed, and still trying
    keeper.stop()
    keeper.thread.join(timeout=2)
    assert not keeper.thread.is_alive()
