"""SpamAssassin's Bayes as the spamassassin container last saw it (issue 29): how much it
learned, for /health and the metrics. The container writes `bayes` beside spamd's socket
(services/spamd/spamassassin-entrypoint.sh); the gateway has that volume for its probes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field


class BayesState(BaseModel):
    spam: int = Field(description="Messages learned as spam")
    ham: int = Field(description="Messages learned as ham")
    tokens: int = Field(description="Tokens in the database (old ones expire)")
    newest: float = Field(description="When a token was last learned or seen (Unix time)")
    checked: float = Field(description="When the container last looked (Unix time)")


def status_path(spamassassin_address: str) -> Path | None:
    """Where the state is: beside spamd's unix socket; None when spamd is reached over TCP."""
    return Path(spamassassin_address).parent / "bayes" if \
        spamassassin_address.startswith("/") else None


def read_state(path: Path | None) -> BayesState | None:
    if path is None:
        return None
    try:
        return BayesState.model_validate(json.loads(path.read_text()[:1000]))
    except (OSError, ValueError):
        return None  # not written yet, or being replaced


class BayesCollector(Collector):
    """The state as gauges, read at each scrape."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = read_state(self.path)
        if state is None:
            return
        learned = GaugeMetricFamily("secumail_bayes_learned",
                                    "Messages SpamAssassin's Bayes has learned, by kind",
                                    labels=["kind"])
        learned.add_metric(["spam"], state.spam)
        learned.add_metric(["ham"], state.ham)
        yield learned
        yield GaugeMetricFamily("secumail_bayes_tokens", "Tokens in the Bayes database",
                                value=state.tokens)
        yield GaugeMetricFamily("secumail_bayes_newest_token_timestamp_seconds",
                                "When a Bayes token was last learned or seen",
                                value=state.newest)
