"""`secumail-spamd`: the SpamAssassin content filter (port 10026, mail back to Postfix 10027)."""

from __future__ import annotations

from secumail.backend import BackendError
from secumail.protocols import spamc
from secumail.relay import (
    BACKEND_ERRORS,
    FilterService,
    MessageInfo,
    Verdict,
    filter_service,
)
from secumail.runtime import run_service
from secumail.settings import Settings, load_settings
from services.spamd.verdict import oversized_verdict, spam_verdict, unchecked_verdict


def make_filter(settings: Settings) -> FilterService:
    async def inspect(info: MessageInfo, message: bytes) -> Verdict:
        if settings.spam_max_size and len(message) > settings.spam_max_size:
            return oversized_verdict(len(message), settings.spam_max_size)
        try:
            result = await spamc.check(settings.spamassassin_address, message,
                                       settings.relay_timeout)
        except BackendError as error:
            BACKEND_ERRORS.labels("spamd").inc()
            return unchecked_verdict(str(error), settings.spamd_fail_open)
        return spam_verdict(
            result, settings.spam_tag_score, settings.spam_reject_score, settings.spam_action,
            settings.spam_report_symbols,
        )

    return filter_service(
        "spamd", settings.spamd_listen, settings.spamd_next_hop,
        settings.spamd_allowed_clients, inspect, settings,
    )


def main() -> None:
    settings = load_settings()
    run_service("spamd", settings, lambda: make_filter(settings))


if __name__ == "__main__":
    main()
