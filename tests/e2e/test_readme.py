"""Every `console` block of README.md, run against the test stack: the README cannot drift.

A block is a list of `$ command` lines, each followed by the lines it must print, in order
(`...` stands for anything; `$NAME` for a variable's value), within 30 s (it is run again
until then). A command with nothing under it must succeed. Variables set by `$ NAME=value`
lines carry over from block to block; the README's own values of the ones below are the
admin's to change, so the test gives them its own. `docker compose` runs as the suite's
compose command (its files and project)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Stack

README = ROOT / "README.md"
BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
ASSIGNMENT = re.compile(r"([A-Z]+)=(\S+)(?:\s+#.*)?$")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def blocks(text: str) -> list[list[Step]]:
    parsed = []
    for body in BLOCK.findall(text):
        steps: list[Step] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:]))
            elif line.strip():
                assert steps, f"output before any command: {line!r}"
                steps[-1].expected.append(line)
        parsed.append(steps)
    return parsed


def pattern(line: str, variables: dict[str, str]) -> re.Pattern[str]:
    for name in sorted(variables, key=len, reverse=True):  # $TOKEN before $TO
        line = line.replace(f"${name}", variables[name])
    return re.compile(".*".join(re.escape(part) for part in line.split("...")))


def unmatched(output: str, expected: list[str], variables: dict[str, str]) -> str | None:
    """The first expected line not found in the output (in order), or None."""
    lines = iter(output.splitlines())
    for wanted in expected:
        regex = pattern(wanted, variables)
        if not any(regex.fullmatch(line.rstrip()) for line in lines):
            return wanted
    return None


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
    variables: dict[str, str] = {}
    for steps in blocks(README.read_text()):
        for step in steps:
            if assigned := ASSIGNMENT.fullmatch(step.command.split("  ")[0].strip()) \
                    or re.fullmatch(r"([A-Z]+)=(\$\(.*\))", step.command):
                name = assigned.group(1)
                assert name in ours, f"a README variable the test does not know: {name}"
                variables[name] = ours[name]
                continue
            command = step.command.replace("docker compose", compose)
            script = "".join(f"{k}={v!s}\n" for k, v in variables.items()) + command
            # What a command shows may come a moment later (mail is delivered just after it
            # is accepted): a command is run again, for up to 30 s, until it prints it.
            deadline = time.monotonic() + 30
            while True:
                done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                      timeout=300, cwd=tmp_path)
                output = done.stdout + done.stderr
                if not step.expected:
                    assert done.returncode == 0, f"$ {step.command}\n{output[-3000:]}"
                    break
                missing = unmatched(output, step.expected, variables)
                if missing is None:
                    break
                assert time.monotonic() < deadline, \
                    f"$ {step.command}\nexpected: {missing}\ngot:\n{output[-3000:]}"
                time.sleep(2)


@pytest.mark.parametrize(("output", "expected", "found"), [
    ("a\n<** 450 4.7.1 <x@y>: Greylisted, please try again in 2 seconds\n",
     ["<** 450 4.7.1 <$TO>: Greylisted, please try again in ... seconds"], True),
    ("<** 550 5.7.23 <x@y>: SPF check failed\n", ["<** 450 ..."], False),
    ("second\nfirst\n", ["first", "second"], False),  # in order
])
def test_expected_lines_match_as_the_readme_means(output: str, expected: list[str],
                                                  found: bool) -> None:
    assert (unmatched(output, expected, {"TO": "x@y"}) is None) is found
