"""The MTA-STS resolver's configuration as the Postfix container writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secumail.settings import Settings
from services.postfix import outbound_tls
from services.postfix.children import CommandKeeper
from services.postfix.outbound_tls import LISTEN, daemon_config


def test_the_resolver_answers_postfix_alone_and_enforces_only_enforce_policies() -> None:
    config = yaml.safe_load(daemon_config(Path("/var/lib/secumail/mta-sts/p.sqlite")))
    assert (config["host"], config["port"]) == ("127.0.0.1", LISTEN.port)
    zone = config["default_zone"]
    # testing-mode policies are not enforced (RFC 8461 5); the MX name goes out as SNI.
    assert zone["strict_testing"] is False and zone["require_sni"] is True
    # Kept on a volume: a restart does not forget a policy (RFC 8461 10.2).
    assert config["cache"] == {"type": "sqlite", "options": {
        "filename": "/var/lib/secumail/mta-sts/p.sqlite", "threads": 1}}


def test_the_resolver_starts_with_the_cas_of_the_setting_and_only_when_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[CommandKeeper] = []
    monkeypatch.setattr(outbound_tls, "in_container", lambda: True)
    monkeypatch.setattr(CommandKeeper, "start", lambda keeper: started.append(keeper))
    config = tmp_path / "mta-sts-daemon.yml"
    keeper = outbound_tls.start_sts_resolver(
        Settings(outbound_tls_ca_file="/etc/secumail/ca.pem"), config, tmp_path / "p.sqlite",
        user=5054)
    assert keeper is not None and started == [keeper]
    assert keeper.command == ["mta-sts-daemon", "-v", "info", "-c", str(config)]
    assert keeper.env is not None and keeper.env["SSL_CERT_FILE"] == "/etc/secumail/ca.pem"
    assert keeper.user == 5054 and yaml.safe_load(config.read_text())["port"] == LISTEN.port
    assert outbound_tls.start_sts_resolver(Settings(outbound_mta_sts=False), config) is None
    assert len(started) == 1
