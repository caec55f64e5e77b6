"""SpamAssassin's rules kept current (issue 29): the spamassassin container runs sa-update
at start and then every SA_UPDATE_INTERVAL seconds, never holding up spamd; offline it says
why; new rules are loaded (spamd reloads) only when they pass `spamassassin --lint`.

No traffic leaves the machine: the container has no network at all, so sa-update fails as it
would offline, and the rules a successful sa-update would leave in its update directory are
put there by the test, as sa-update lays them out (a channel .cf including its rule files).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conftest import Stack

CHANNEL = "/var/lib/spamassassin/updates/4.0.1/channel"
MARKER = "secumail-e2e-rules-marker"
# A rule set as sa-update leaves it: the stock rules, one of ours, the channel's include file.
PLANT = f"""set -eu
rm -rf {CHANNEL}.tmp && mkdir -p {CHANNEL}.tmp/updates_spamassassin_org
cp /usr/share/spamassassin/*.cf {CHANNEL}.tmp/updates_spamassassin_org/
printf '%s\\nscore SECUMAIL_E2E_RULE 0.5\\n' "$1" > {CHANNEL}.tmp/updates_spamassassin_org/99_e2e.cf
cd {CHANNEL}.tmp
for f in updates_spamassassin_org/*.cf; do echo "include $f"; done > updates_spamassassin_org.cf
rm -rf {CHANNEL} && mv {CHANNEL}.tmp {CHANNEL}
"""
GOOD_RULE = f"body SECUMAIL_E2E_RULE /{MARKER}/"
BROKEN_RULE = "body SECUMAIL_E2E_RULE /(/"  # an unbalanced regular expression: lint fails
MESSAGE = f"From: a@example.org\nTo: b@example.org\nSubject: rules\n\nhello {MARKER}\n"


@pytest.fixture
def spamassassin(stack: Stack) -> Iterator[str]:
    """The stack's spamassassin image on its own, without any network."""
    name = f"secumail-e2e-rules-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--init", "--name", name, "--network", "none",
                    "-e", "SECUMAIL_SA_UPDATE=yes", "-e", "SA_UPDATE_INTERVAL=2",
                    "-e", "SPAMD_OPTIONS=-L --max-children=1 --min-children=1",
                    "secumail/spamassassin"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)


def run(name: str, *command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", "-i", name, *command], input=stdin,
                          capture_output=True, text=True, timeout=120)


def status(name: str) -> dict[str, object]:
    done = run(name, "cat", "/run/spamd/rules")
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}


def wait_for(what: Callable[[], bool], name: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            raise AssertionError(f"rules status {status(name)}\n{logs.stderr[-3000:]}")
        time.sleep(1)


def rules_hit(name: str) -> str:
    return run(name, "spamc", "-U", "/run/spamd/spamd.sock", "-R", stdin=MESSAGE).stdout


def test_offline_spamd_starts_and_says_why_then_loads_only_rules_that_pass_lint(
        spamassassin: str) -> None:
    name = spamassassin
    # Offline: spamd serves with the image's rules, and the container says why it could not
    # update them (its log, and /run/spamd/rules for the gateway's /health).
    wait_for(lambda: "sa-update could not update" in str(status(name).get("error", "")), name)
    assert status(name)["rules"] == "image"
    assert "SECUMAIL_SA_UPDATE_MIRROR" in str(status(name)["error"])
    assert run(name, "spamc", "-U", "/run/spamd/spamd.sock", "-K").returncode == 0
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    assert "rules-update: sa-update could not update the rules" in logs.stderr

    # Rules that fail lint are never loaded: spamd keeps the image's.
    assert run(name, "sh", "-c", PLANT, "plant", BROKEN_RULE).returncode == 0
    wait_for(lambda: "fail spamassassin --lint" in str(status(name).get("error", "")), name)
    assert status(name)["rules"] == "image"
    assert "SECUMAIL_E2E_RULE" not in rules_hit(name)

    # Rules that pass lint are loaded: spamd reloads, and the new rule hits.
    assert run(name, "sh", "-c", PLANT, "plant", GOOD_RULE).returncode == 0
    wait_for(lambda: str(status(name).get("rules", "")).startswith("rules-"), name)
    wait_for(lambda: "SECUMAIL_E2E_RULE" in rules_hit(name), name, timeout=60)
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.RestartCount}}",
                            name], capture_output=True, text=True)
    assert state.stdout.split() == ["true", "0"], state.stdout
