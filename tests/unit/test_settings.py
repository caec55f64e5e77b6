"""Settings: read once, validated, a bad value names its variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from secumail.netaddr import HostPort, parse_host_port, parse_network, postfix_network
from secumail.settings import Settings, carry_renamed, load_settings, parse_weighted_zone


def test_defaults_match_the_documented_ones() -> None:
    settings = Settings()
    assert settings.policy_listen == HostPort("0.0.0.0", 10023)
    assert settings.metrics_listen == HostPort("0.0.0.0", 9100)
    assert settings.greylist_delay == 300
    assert settings.greylist_retry_window == 2 * 86400
    assert settings.greylist_max_age == 35 * 86400
    assert settings.greylist_auto_whitelist == 5
    assert settings.spf_reject_fail is True
    assert settings.dnsbl_zones == []
    assert settings.dns_servers == []


def test_comma_lists_and_addresses_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECUMAIL_DNS_SERVERS", "127.0.0.1:5353, [::1]:53,10.0.0.2")
    monkeypatch.setenv("SECUMAIL_MYNETWORKS", "127.0.0.0/8, [2001:db8::]/48")
    monkeypatch.setenv("SECUMAIL_DNSBL_ZONES", "zen.spamhaus.org*2, bl.example")
    monkeypatch.setenv("SECUMAIL_GREYLIST_WHITELIST_CLIENTS", "")
    settings = Settings()
    assert settings.dns_servers == [
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
        HostPort("10.0.0.2", 53),
    ]
    assert settings.in_mynetworks(ipaddress.ip_address("2001:db8:0:1::7"))
    assert not settings.in_mynetworks(ipaddress.ip_address("192.0.2.1"))
    assert not settings.in_mynetworks(None)
    assert settings.weighted_dnsbl_zones == [("zen.spamhaus.org", 2.0), ("bl.example", 1.0)]
    assert settings.greylist_whitelist_clients == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SECUMAIL_GREYLIST_DELAY", "five minutes"),
        ("SECUMAIL_POLICY_LISTEN", "10023"),
        ("SECUMAIL_DNSBL_ZONES", "zen.spamhaus.org*heavy"),
        ("SECUMAIL_MYNETWORKS", "192.168.1/33"),
        ("SECUMAIL_GREYLIST_STORE", "mysql://x"),
        ("SECUMAIL_LOG_FORMAT", "xml"),
        ("SECUMAIL_SPF_REJECT_FAIL", "maybe"),
        ("SECUMAIL_SPAM_QUARANTINE_SCORE", "4"),  # below the tag score (5)
    ],
)
def test_bad_value_stops_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stop:
        load_settings()
    assert stop.value.code == 2
    assert variable in capsys.readouterr().err


def test_address_parsing() -> None:
    assert parse_host_port("clamav:10025") == HostPort("clamav", 10025)
    assert parse_host_port("[::1]:10023") == HostPort("::1", 10023)
    assert parse_host_port("::1", default_port=53) == HostPort("::1", 53)
    assert str(HostPort("::1", 53)) == "[::1]:53"
    for bad in ("host:", ":25", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)
    assert parse_network("[::1]/128") == ipaddress.ip_network("::1/128")
    assert postfix_network(parse_network("2001:db8::/48")) == "[2001:db8::]/48"
    assert parse_weighted_zone("Bl.Example.*0.5") == ("bl.example", 0.5)


def test_the_gateways_secrets_found_elsewhere_are_named() -> None:
    from secumail.settings import misplaced_secrets

    assert misplaced_secrets({"SECUMAIL_ADMIN_TOKEN": "x" * 20, "SECUMAIL_METRICS_TOKEN": "",
                              "SECUMAIL_HOSTNAME": "mx"}) == ["SECUMAIL_ADMIN_TOKEN"]
    assert misplaced_secrets({}) == []


def test_a_setting_may_come_from_a_docker_secret(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker Swarm mounts secrets as files in /run/secrets, named as the variable in lower
    case; a variable set in the environment still wins."""
    (tmp_path / "secumail_admin_token").write_text("a-token-from-a-secret-0123456789\n")
    (tmp_path / "secumail_hostname").write_text("mx.from-a-secret.test")
    monkeypatch.delenv("SECUMAIL_ADMIN_TOKEN", raising=False)
    settings = Settings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.admin_token.get_secret_value() == "a-token-from-a-secret-0123456789"
    assert settings.hostname == "mx.from-a-secret.test"
    monkeypatch.setenv("SECUMAIL_HOSTNAME", "mx.from-the-environment.test")
    assert Settings(_secrets_dir=tmp_path).hostname == "mx.from-the-environment.test"  # type: ignore[call-arg]


def test_a_renamed_setting_still_works_and_the_new_name_is_said(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # secumail.env written for an earlier version keeps working after an upgrade.
    # (set, then removed: monkeypatch then removes what load_settings writes there)
    monkeypatch.setenv("SECUMAIL_SPAMASSASSIN_ADDRESS", "unset")
    monkeypatch.delenv("SECUMAIL_SPAMASSASSIN_ADDRESS")
    monkeypatch.setenv("SECUMAIL_SPAMD_ADDRESS", "spamassassin:783")
    assert load_settings().spamassassin_address == "spamassassin:783"
    assert "SECUMAIL_SPAMD_ADDRESS is now called SECUMAIL_SPAMASSASSIN_ADDRESS" \
        in capsys.readouterr().err


def test_the_new_name_wins_over_the_old_and_the_old_is_said_to_be_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"SECUMAIL_SPAMD_ADDRESS": "old:783", "SECUMAIL_SPAMASSASSIN_ADDRESS": "new:783"}
    notes = carry_renamed(environ)
    assert environ["SECUMAIL_SPAMASSASSIN_ADDRESS"] == "new:783"
    assert notes == ["SECUMAIL_SPAMD_ADDRESS is ignored: SECUMAIL_SPAMASSASSIN_ADDRESS, its new "
                     "name, is set too; remove SECUMAIL_SPAMD_ADDRESS"]
    assert carry_renamed({}) == []


def test_a_setting_split_in_two_keeps_a_sites_value_for_both() -> None:
    """SECUMAIL_RELAY_TIMEOUT covered the scanners' answers too: a site that raised it for a
    slow spamd keeps that, and is told the new name."""
    environ = {"SECUMAIL_RELAY_TIMEOUT": "300"}
    [note] = carry_renamed(environ)
    assert environ["SECUMAIL_SCANNER_TIMEOUT"] == "300" and "SECUMAIL_SCANNER_TIMEOUT" in note
    environ = {"SECUMAIL_RELAY_TIMEOUT": "300", "SECUMAIL_SCANNER_TIMEOUT": "60"}
    assert carry_renamed(environ) == [] and environ["SECUMAIL_SCANNER_TIMEOUT"] == "60"
    environ = {"SECUMAIL_REQUEST_TIMEOUT": "10"}
    carry_renamed(environ)
    assert environ["SECUMAIL_DKIM_ANSWER_TIMEOUT"] == "10"
