"""The Dockerfiles: all on debian:bookworm-slim, the Python ones opening with the same base
(so that Docker builds it once), each with a healthcheck, and no root where avoidable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(
    p for p in ROOT.glob("**/*Dockerfile") if ".venv" not in p.parts and "tests" not in p.parts
)
PYTHON_IMAGES = {"postfix", "policy", "clamav", "spamd", "dkim", "gateway"}
BASE = re.compile(r"# ---- shared Python base.*?# ---- end of the shared Python base", re.S)


def test_every_python_image_opens_with_the_same_base() -> None:
    blocks = {}
    for path in DOCKERFILES:
        found = BASE.search(path.read_text())
        if found:
            blocks[path.parent.name] = found.group(0)
    assert PYTHON_IMAGES <= set(blocks)
    assert len(set(blocks.values())) == 1, "the shared base differs between Dockerfiles"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_basics(path: Path) -> None:
    text = path.read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM")]
    assert froms == ["FROM debian:bookworm-slim"]
    assert "HEALTHCHECK" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    if path.parent.name == "postfix" and path.name == "Dockerfile":
        assert users == []  # Postfix's master must start as root; its services drop privileges
    else:
        assert users and users[-1] != "root"
