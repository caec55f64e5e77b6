"""`.env.example` documents every setting with its real default."""

from __future__ import annotations

from pathlib import Path

from secumail.settings import ENV_PREFIX, Settings

ENV_EXAMPLE = Path(__file__).parents[2] / ".env.example"


def documented() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith(ENV_PREFIX):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_every_setting_is_documented_and_nothing_else() -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(documented()) == fields


def test_documented_values_are_the_defaults() -> None:
    from_file = Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in documented().items()})
    assert from_file == Settings()
