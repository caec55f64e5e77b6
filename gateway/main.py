"""`secumail-gateway`: health, metrics and administration of the chain (port 8080)."""

from __future__ import annotations

import logging

import uvicorn

from gateway.app import create_app
from gateway.http import DeadlineH11Protocol
from secumail.logs import setup_logging
from secumail.settings import Settings, load_settings


def serve(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per scrape otherwise
    DeadlineH11Protocol.request_timeout = settings.gateway_request_timeout
    uvicorn.run(
        create_app(settings), host=settings.gateway_listen.host,
        port=settings.gateway_listen.port, loop="uvloop", log_config=None,
        http=DeadlineH11Protocol, limit_concurrency=settings.gateway_max_connections,
        # Our middleware logs requests without their query strings (tokens stay out).
        access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout),
    )


def main() -> None:
    serve(load_settings())


if __name__ == "__main__":
    main()
