"""The Dockerfiles: all on debian:bookworm-slim; the Python images are stages of the one
Dockerfile at the top, over one shared base; each image has a healthcheck, and runs as no
root where avoidable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(
    p for p in ROOT.glob("**/*Dockerfile") if ".venv" not in p.parts and "tests" not in p.parts
)
PYTHON_IMAGES = {"postfix", "policy", "clamav", "spamd", "dkim", "gateway"}


def stages(text: str) -> dict[str, str]:
    """`FROM ... AS name` -> the stage's text."""
    found = re.split(r"^(FROM \S+(?: AS \S+)?)\n", text, flags=re.M)
    return {header.rsplit(" ", 1)[-1]: body for header, body in zip(found[1::2], found[2::2],
                                                                     strict=True)}


def test_every_python_image_is_a_stage_over_the_shared_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["debian:bookworm-slim"] + ["python"] * 6
    found = stages(text)
    assert set(found) == {"python", *PYTHON_IMAGES}
    compose = (ROOT / "compose.yaml").read_text()
    for image in PYTHON_IMAGES:
        assert f"build: {{context: ., target: {image}}}" in compose
        body = found[image]
        assert "HEALTHCHECK" in body and "CMD [" in body, image
        users = re.findall(r"^USER (\S+)", body, re.M)
        if image == "postfix":
            assert users == []  # Postfix's master must start as root; its services drop them
        else:
            assert users and users[-1] != "root", image


@pytest.mark.parametrize("path", [p for p in DOCKERFILES if p != ROOT / "Dockerfile"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_other_images(path: Path) -> None:
    text = path.read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM")]
    assert froms == ["FROM debian:bookworm-slim"]
    assert "HEALTHCHECK" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] != "root"
