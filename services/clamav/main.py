"""`secumail-clamav`: the ClamAV content filter (port 10025, clean mail on to 10026)."""

from __future__ import annotations

from secumail.backend import BackendError
from secumail.protocols import clamd
from secumail.relay import (
    BACKEND_ERRORS,
    FilterService,
    MessageInfo,
    Verdict,
    filter_service,
)
from secumail.runtime import run_service
from secumail.settings import Settings, load_settings
from services.clamav.verdict import unscanned_verdict, virus_verdict


def make_filter(settings: Settings) -> FilterService:
    scanner = clamd.Clamd(
        settings.clamd_address, settings.relay_timeout, settings.clamd_stream_max_length
    )

    async def inspect(info: MessageInfo, message: bytes) -> Verdict:
        try:
            result = await scanner.scan(message)
        except BackendError as error:
            BACKEND_ERRORS.labels("clamav").inc()
            return unscanned_verdict(str(error), settings.clamav_fail_open, settings.hostname)
        return virus_verdict(result, settings.virus_action, settings.hostname)

    return filter_service(
        "clamav", settings.clamav_listen, settings.clamav_next_hop,
        settings.clamav_allowed_clients, inspect, settings,
    )


def main() -> None:
    settings = load_settings()
    run_service("clamav", settings, lambda: make_filter(settings))


if __name__ == "__main__":
    main()
