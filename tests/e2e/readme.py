"""README.md's `console` blocks, read and run as written (test_readme.py runs the compose
stack's, test_swarm.py those of the "Cluster (Docker Swarm)" section, marked `console swarm`).

A block is a list of `$ command` lines, each followed by the lines it must print, in order
(`...` stands for anything; `$NAME` for a variable's value), within 30 s (it is run again
until then). A command with nothing under it must succeed. Variables set by `$ NAME=value`
lines carry over from block to block; the README's own values are the admin's to change, so
a test gives them its own."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.conftest import ROOT

README = ROOT / "README.md"
BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
SWARM_BLOCK = re.compile(r"^```console swarm\n(.*?)^```", re.S | re.M)
ASSIGNMENT = re.compile(r"([A-Z]+)=(\S+)(?:\s+#.*)?$")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def blocks(text: str, kind: re.Pattern[str] = BLOCK) -> list[list[Step]]:
    parsed = []
    for body in kind.findall(text):
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


def run_blocks(steps_of_blocks: list[list[Step]], ours: dict[str, str], cwd: Path,
               rewrite: Callable[[str], str] = lambda command: command,
               env: dict[str, str] | None = None,
               variables: dict[str, str] | None = None) -> dict[str, str]:
    """Run each step as the README means it; `rewrite` turns a README command into the
    test's (its compose files, say). Returns the variables set, for the next blocks."""
    variables = {} if variables is None else variables
    for steps in steps_of_blocks:
        for step in steps:
            if assigned := ASSIGNMENT.fullmatch(step.command.split("  ")[0].strip()) \
                    or re.fullmatch(r"([A-Z]+)=(\$\(.*\))", step.command):
                name = assigned.group(1)
                assert name in ours, f"a README variable the test does not know: {name}"
                variables[name] = ours[name]
                continue
            command = rewrite(step.command)
            script = "".join(f"{k}={v!s}\n" for k, v in variables.items()) + command
            # What a command shows may come a moment later (mail is delivered just after it
            # is accepted): a command is run again, for up to 30 s, until it prints it.
            deadline = time.monotonic() + 30
            while True:
                done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                      timeout=600, cwd=cwd, env=env)
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
    return variables
