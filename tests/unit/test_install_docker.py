"""scripts/install-docker.sh finds the Debian mirror in apt's sources, never in itself (issue
30). Only its functions run here, against directories of sources made by the tests: the
script itself would install packages and restart dockerd."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "install-docker.sh"
# Sourced, the script only defines its functions when it has this guard; without it, sourcing
# would run the whole installation.
RUN_GUARD = 'if [ "${BASH_SOURCE[0]}" = "$0" ]; then'


def run_function(name: str, apt_dir: Path) -> subprocess.CompletedProcess[str]:
    """`name` from the script, with apt's sources read from `apt_dir`."""
    if RUN_GUARD not in SCRIPT.read_text():
        pytest.fail("the script runs when sourced: its functions cannot be tried alone")
    return subprocess.run(
        ["bash", "-c", 'source "$1" && "$2"', "bash", str(SCRIPT), name],
        env={**os.environ, "APT_SOURCES_DIR": str(apt_dir)},
        capture_output=True, text=True, timeout=30, check=False)


def sources(tmp_path: Path, files: dict[str, str]) -> Path:
    """An /etc/apt of these files (paths relative to it)."""
    apt_dir = tmp_path / "apt"
    (apt_dir / "sources.list.d").mkdir(parents=True)
    for relative, text in files.items():
        (apt_dir / relative).write_text(text)
    return apt_dir


def mirror(tmp_path: Path, files: dict[str, str]) -> str:
    result = run_function("debian_mirror", sources(tmp_path, files))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_script_names_no_mirror_and_parses() -> None:
    text = SCRIPT.read_text()
    assert "debian.org" not in text
    # No URL with a host name at all (the help text's placeholder is no host).
    assert re.findall(r"https?://[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", text) == []
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_a_one_line_sources_list(tmp_path: Path) -> None:
    assert mirror(tmp_path, {"sources.list": (
        "# deb http://commented.test/debian bookworm main\n"
        "deb-src http://source-only.test/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/a.gpg] http://mirror.test/debian/ "
        "bookworm main contrib # the mirror\n"
        "deb http://mirror.test/debian-security bookworm-security main\n"
    )}) == "http://mirror.test/debian"


def test_a_deb822_sources_file(tmp_path: Path) -> None:
    apt_dir = sources(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n"
        "URIs: https://deb.nodesource.test/node_20.x\n"
        "Suites: nodistro\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.test/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
        "\n"
        "# http://snapshot.test/archive/debian/20250520T000000Z\n"
        "types: deb deb-src\n"
        "URIs:\n"
        " http://mirror.test/debian\n"
        " http://second.test/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.test/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
    )})
    result = run_function("debian_mirror", apt_dir)
    assert (result.returncode, result.stdout) == (0, "http://mirror.test/debian\n")
    security = run_function("debian_security_mirror", apt_dir)
    assert (security.returncode, security.stdout) == (0, "http://mirror.test/debian-security\n")


def test_the_bookworm_suite_names_a_mirror_whatever_its_path(tmp_path: Path) -> None:
    assert mirror(tmp_path, {"sources.list.d/snapshot.list": (
        "deb http://snapshot.test/archive/debian/20250520T000000Z bookworm main\n"
    )}) == "http://snapshot.test/archive/debian/20250520T000000Z"


def test_sources_are_taken_in_apts_order_and_third_party_ones_skipped(tmp_path: Path) -> None:
    assert mirror(tmp_path, {
        # Docker's own repository ends in /debian too, but has no main component.
        "sources.list": "deb https://download.docker.test/linux/debian bookworm stable\n",
        "sources.list.d/b.sources": "Types: deb\nURIs: http://b.test/debian\nSuites: "
                                    "bookworm\nComponents: main\n",
        "sources.list.d/a.list": "deb http://a.test/debian bookworm main\n",
        "sources.list.d/0.list.disabled": "deb http://disabled.test/debian bookworm main\n",
    }) == "http://a.test/debian"


@pytest.mark.parametrize(
    ("files", "read"),
    [
        ({}, "read: none"),
        ({"sources.list.d/nodesource.list": "deb https://deb.nodesource.test/node_20.x "
                                            "nodistro main\n",
          "sources.list.d/off.sources": "Types: deb\nURIs: http://off.test/debian\nSuites: "
                                        "bookworm\nComponents: main\nEnabled: no\n"},
         "read: {apt}/sources.list.d/nodesource.list {apt}/sources.list.d/off.sources"),
    ],
    ids=["no-sources", "no-debian-mirror"],
)
def test_without_a_debian_mirror_it_stops_saying_what_it_read(
    tmp_path: Path, files: dict[str, str], read: str
) -> None:
    apt_dir = sources(tmp_path, files)
    result = run_function("debian_mirror", apt_dir)
    assert result.returncode != 0 and result.stdout == ""
    assert "no Debian mirror found in apt's sources" in result.stderr
    assert read.format(apt=apt_dir) in result.stderr
    security = run_function("debian_security_mirror", apt_dir)
    assert (security.returncode, security.stdout) == (0, "")
