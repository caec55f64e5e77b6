"""The MTA-STS resolver's configuration as the Postfix container writes it."""

from __future__ import annotations

import yaml

from services.postfix.outbound_tls import LISTEN, daemon_config


def test_the_resolver_answers_postfix_alone_and_enforces_only_enforce_policies() -> None:
    config = yaml.safe_load(daemon_config())
    assert (config["host"], config["port"]) == ("127.0.0.1", LISTEN.port)
    zone = config["default_zone"]
    # testing-mode policies are not enforced (RFC 8461 5); the MX name goes out as SNI.
    assert zone["strict_testing"] is False and zone["require_sni"] is True
    assert config["cache"]["type"] == "internal"
