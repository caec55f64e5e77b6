"""`.env.example` documents every setting with its real default, and every variable
compose.yaml reads, in the section of the file it belongs in."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from secumail.settings import COMPOSE_VARIABLES, ENV_PREFIX, Settings, misplaced_in_env_file

ROOT = Path(__file__).parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
SECTION_2 = "# === 2. In secumail.env"
# Read by compose itself, not by a SecuMail setting.
COMPOSE_ONLY = {"COMPOSE_PROFILES"}
COMPOSE_FILES = ("compose.yaml", "compose.ipv6.yaml", "compose.offline.yaml")


def documented(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if re.match(r"[A-Z0-9_]+=", line):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def sections() -> tuple[dict[str, str], dict[str, str]]:
    env, secumail_env = ENV_EXAMPLE.read_text().split(SECTION_2)
    return documented(env), documented(secumail_env)


def compose_variables() -> dict[str, str]:
    """`${NAME:-default}` in the compose files (the test overlay's own variables aside)."""
    text = "".join((ROOT / name).read_text() for name in COMPOSE_FILES)
    return dict(re.findall(r"\$\{([A-Z0-9_]+):-([^}]*)\}", text))


def test_every_setting_is_documented_and_nothing_else() -> None:
    env, secumail_env = sections()
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(env) | set(secumail_env) == fields | set(compose_variables()) | COMPOSE_ONLY


def test_what_compose_reads_is_in_the_env_section_with_compose_defaults() -> None:
    env, secumail_env = sections()
    assert set(env) == set(compose_variables()) | COMPOSE_ONLY
    assert not set(env) & set(secumail_env)
    for name, default in compose_variables().items():
        assert env[name] == default, name


def test_compose_file_is_shown_as_an_example_never_set() -> None:
    """Issue 32: `COMPOSE_FILE=compose.yaml`, copied into .env as if it were the default,
    silently stopped compose from reading compose.override.yaml."""
    text = ENV_EXAMPLE.read_text()
    assert not re.search(r"^\s*COMPOSE_FILE=", text, re.M)
    assert re.search(r"^# COMPOSE_FILE=compose\.yaml:compose\.ipv6\.yaml:compose\.override\.yaml$",
                     text, re.M)


def test_documented_values_are_the_defaults() -> None:
    env, secumail_env = sections()
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    values = {k: v for k, v in (env | secumail_env).items() if k in fields}
    from_file = Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in values.items()})
    assert from_file == Settings()


def test_the_code_knows_what_only_compose_reads() -> None:
    env, _ = sections()
    assert set(env) | {"COMPOSE_FILE"} == COMPOSE_VARIABLES  # COMPOSE_FILE: an example only


def test_a_compose_variable_in_secumail_env_is_found() -> None:
    text = "# SECUMAIL_FILTER_SUBNET=10.0.0.0/24 (a comment)\nSECUMAIL_DOMAINS=example.org\n" \
           "SECUMAIL_FILTER_SUBNET=10.9.0.0/24\nSECUMAIL_CLAMAV_REPLICAS=3\n"
    assert misplaced_in_env_file(text) == ["SECUMAIL_CLAMAV_REPLICAS", "SECUMAIL_FILTER_SUBNET"]
    assert misplaced_in_env_file((ROOT / "secumail.env.example").read_text()) == []


def test_the_isolated_host_file_mounts_the_signature_folder_and_turns_updates_off(
    tmp_path: Path,
) -> None:
    """compose.offline.yaml as compose reads it over compose.yaml (README, "An isolated
    host"): clamd on the admin's signature folder, read-only, with no freshclam; no
    sa-update; everything else as compose.yaml has it."""
    import shutil
    import subprocess

    import yaml

    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:
        pytest.skip("no docker compose here (bash scripts/install-docker.sh provides it)")
    (tmp_path / "signatures").mkdir()
    env = {**os.environ, "SECUMAIL_CLAMAV_SIGNATURES": str(tmp_path / "signatures")}
    env.pop("COMPOSE_FILE", None)
    done = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "compose.yaml"), "-f",
         str(ROOT / "compose.offline.yaml"), "config"],
        capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    clamd = config["services"]["clamd"]
    assert clamd["environment"]["FRESHCLAM"] == "no"
    [signatures] = [v for v in clamd["volumes"] if v["target"] == "/var/lib/clamav"]
    assert signatures["type"] == "bind" and signatures["read_only"]
    assert signatures["source"] == str(tmp_path / "signatures")
    assert config["services"]["spamassassin"]["environment"]["SECUMAIL_SA_UPDATE"] == "no"
    assert "postfix" in config["services"]  # the rest as compose.yaml has it


def test_the_admins_own_settings_are_never_in_git() -> None:
    """Issue 32: secumail.env was tracked, so `git pull` to upgrade collided with the admin's
    own settings. It is made from secumail.env.example and git ignores it, as .env."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "secumail.env", ".env"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert tracked == ""
    for own in ("secumail.env", ".env"):
        assert subprocess.run(["git", "check-ignore", "-q", own], cwd=ROOT).returncode == 0
    assert (ROOT / "secumail.env.example").exists()
