"""Every `console` block of README.md, run against the test stack: the README cannot drift
(tests/e2e/readme.py says how a block reads). `docker compose` runs as the suite's compose
command (its files and project)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.readme import README, blocks, run_blocks, unmatched


def test_readme_blocks_are_found_and_well_formed() -> None:
    parsed = blocks(README.read_text())
    assert len(parsed) >= 5
    commands = [step.command for steps in parsed for step in steps]
    assert any(c.startswith("swaks") for c in commands)
    # Shell blocks of any other kind would not be run: there are none.
    assert not re.search(r"^```(sh|bash|shell)\s*$", README.read_text(), re.M)


def test_every_readme_command_prints_what_the_readme_says(stack: Stack, tmp_path: Path) -> None:
    gateway = os.environ["SECUMAIL_GATEWAY_PUBLISH"]
    ours = {
        "MX": f"{stack.smtp_host}:{stack.smtp_port}",
        "TO": "alice@secumail.test",
        "FROM": "you@sender.test",  # the test DNS has it, without SPF
        "HELO": "client.sender.test",
        "WAIT": "3",  # the test stack's delay is 2 s
        "GATEWAY": gateway,
        "TOKEN": "e2e-admin-token-0123456789",
    }
    compose = " ".join(stack.compose)
    run_blocks(blocks(README.read_text()), ours, tmp_path,
               rewrite=lambda command: command.replace("docker compose", compose))


@pytest.mark.parametrize(("output", "expected", "found"), [
    ("a\n<** 450 4.7.1 <x@y>: Greylisted, please try again in 2 seconds\n",
     ["<** 450 4.7.1 <$TO>: Greylisted, please try again in ... seconds"], True),
    ("<** 550 5.7.23 <x@y>: SPF check failed\n", ["<** 450 ..."], False),
    ("second\nfirst\n", ["first", "second"], False),  # in order
])
def test_expected_lines_match_as_the_readme_means(output: str, expected: list[str],
                                                  found: bool) -> None:
    assert (unmatched(output, expected, {"TO": "x@y"}) is None) is found
