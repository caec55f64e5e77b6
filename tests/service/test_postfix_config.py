"""The rendered configuration as Debian's Postfix itself reads it: no warning, no error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from secumail.settings import Settings
from services.postfix.render import render
from testkit.processes import require_binary


@pytest.mark.parametrize("mode", ["before-queue", "after-queue"])
def test_postfix_accepts_the_rendered_configuration(tmp_path: Path, mode: str) -> None:
    postconf = require_binary("postconf")
    settings = Settings(
        domains="secumail.test", rbl_zones="zen.example", mailboxes="bob@secumail.test",
        filter_mode=mode,
    )
    for name, content in render(settings).items():
        (tmp_path / name).write_text(content.replace("/etc/postfix/", f"{tmp_path}/"))
    result = subprocess.run([postconf, "-c", str(tmp_path), "-n"], capture_output=True, text=True)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    master = subprocess.run([postconf, "-c", str(tmp_path), "-M"], capture_output=True, text=True)
    assert master.returncode == 0 and "warning" not in master.stderr, master.stderr
    assert "10027      inet" in master.stdout
    if mode == "after-queue":  # the seed's: queued first, then through the filters
        assert "content_filter = scan:[clamav]:10025" in result.stdout
    else:  # port 25's smtpd proxies each session through the filters
        assert "content_filter" not in result.stdout
        assert "-o smtpd_proxy_filter=inet:clamav:10025" in master.stdout
    table = subprocess.run(
        [
            postconf.replace("postconf", "postmap"),
            "-c",
            str(tmp_path),
            "-q",
            "bob@secumail.test",
            f"texthash:{tmp_path}/virtual_mailboxes",
        ],
        capture_output=True,
        text=True,
    )
    assert table.stdout.strip() == "secumail.test/bob/", table.stderr
