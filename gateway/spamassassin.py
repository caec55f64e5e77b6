"""SpamAssassin as the spamassassin container last saw it (issue 29), for /health and the
metrics: how much its Bayes learned (`bayes`), and which rules spamd loads and whether
sa-update could keep them current (`rules`). The container writes both beside spamd's socket
(services/spamd/spamassassin-entrypoint.sh, rules-update.sh); the gateway has that volume
for its probes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field


class BayesState(BaseModel):
    spam: int = Field(description="Messages learned as spam")
    ham: int = Field(description="Messages learned as ham")
    tokens: int = Field(description="Tokens in the database (old ones expire)")
    newest: float = Field(description="When a token was last learned or seen (Unix time)")
    checked: float = Field(description="When the container last looked (Unix time)")


class RulesState(BaseModel):
    version: str = Field(description="SpamAssassin's version")
    rules: str = Field(description="The rules spamd loads: `image` (the image's own), or "
                       "`rules-DIGEST` (from sa-update, passed lint)")
    checked: float = Field(description="When the container last looked for newer rules "
                           "(Unix time)")
    error: str = Field(description="Why the last look did not keep the rules current (sa-update "
                       "could not reach its mirror, new rules failed lint); empty when it did")


State = TypeVar("State", BayesState, RulesState)


def status_path(spamassassin_address: str, name: str) -> Path | None:
    """Where the container wrote `name` (bayes, rules): beside spamd's unix socket; None
    when spamd is reached over TCP."""
    return Path(spamassassin_address).parent / name if \
        spamassassin_address.startswith("/") else None


def read_state(path: Path | None, model: type[State]) -> State | None:
    if path is None:
        return None
    try:
        return model.model_validate(json.loads(path.read_text()[:2000]))
    except (OSError, ValueError):
        return None  # not written yet, or being replaced


class SpamAssassinCollector(Collector):
    """The states as gauges, read at each scrape."""

    def __init__(self, spamassassin_address: str) -> None:
        self.bayes = status_path(spamassassin_address, "bayes")
        self.rules = status_path(spamassassin_address, "rules")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rules = read_state(self.rules, RulesState)
        if rules is not None:
            yield GaugeMetricFamily("secumail_spamassassin_rules_update_failing",
                                    "1 when the last look for newer SpamAssassin rules failed "
                                    "(/health says why)", value=float(bool(rules.error)))
            yield GaugeMetricFamily("secumail_spamassassin_rules_checked_timestamp_seconds",
                                    "When the container last looked for newer rules",
                                    value=rules.checked)
        state = read_state(self.bayes, BayesState)
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
