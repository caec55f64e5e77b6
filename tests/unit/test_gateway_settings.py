"""The gateway's settings: tokens are secrets (never printed, even when refused), the probe
mailbox defaults to postmaster@ the first domain, addresses parse as elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from secumail.netaddr import HostPort
from secumail.settings import Settings, describe_errors

TOKEN = "s3cret-token-0123456789"


def test_tokens_stay_out_of_repr_and_dumps() -> None:
    settings = Settings(admin_token=TOKEN, metrics_token=TOKEN[::-1])
    assert settings.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    assert TOKEN[::-1] not in repr(settings)


@pytest.mark.parametrize("token", ["short", "has a space in it somewhere", "tab\there-0123456789"])
def test_a_refused_token_is_not_echoed(token: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(admin_token=token)
    [line] = describe_errors(error.value)
    assert line.startswith("SECUMAIL_ADMIN_TOKEN: ") and "a hidden value" in line
    assert token not in line


def test_a_bad_token_stops_a_service_without_printing_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from secumail.settings import load_settings; load_settings()"],
        env={"SECUMAIL_METRICS_TOKEN": "tooshort"}, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "SECUMAIL_METRICS_TOKEN" in result.stderr and "tooshort" not in result.stderr


def test_defaults() -> None:
    settings = Settings(domains=["secumail.test", "other.test"])
    assert settings.gateway_listen == HostPort("0.0.0.0", 8080)
    assert settings.postfix_address == HostPort("postfix", 25)
    assert settings.admin_token.get_secret_value() == ""
    assert settings.probe_address == "postmaster@secumail.test"
    assert Settings(probe_mailbox="Probe@Secumail.Test").probe_address == "probe@secumail.test"


@pytest.mark.parametrize(("name", "value"), [("probe_mailbox", "probe"),
                                             ("probe_mailbox", "@secumail.test"),
                                             ("probe_helo", "nodot"),
                                             ("postfix_address", "postfix")])
def test_bad_gateway_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(**{name: value})
