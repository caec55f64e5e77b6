"""One Prometheus target for the whole stack: every replica's metrics, labelled.

Each replica's metrics listener is scraped at once (the replicas the health round found),
its samples get `service` and `instance` labels, and families of the same name from
several replicas are merged into one, as the exposition format wants. A replica that does
not answer is `secumail_up{service,instance} 0`, like Prometheus's own `up`. Prometheus
must keep these labels: `honor_labels: true` in its scrape config (prometheus.yml).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from gateway.health import HopResult
from secumail.logs import log_event
from secumail.netaddr import HostPort

log = logging.getLogger("secumail.gateway")

# The classic text format: every name here is a legacy one, and Prometheus 2.x (Debian's
# 2.42) knows this content type best.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Target:
    service: str
    instance: str  # ip:port of the metrics listener
    container: str = ""  # the replica's container name, as /health shows it

    @property
    def labels(self) -> dict[str, str]:
        return {"service": self.service, "instance": self.instance,
                "container": self.container or self.instance}

    @property
    def url(self) -> str:
        return f"http://{self.instance}/metrics"


@dataclass
class Scrape:
    target: Target
    families: list[Metric]
    error: str | None = None
    seconds: float = 0.0


def target_for(service: str, host: str, metrics_port: int, container: str | None = None
               ) -> Target:
    return Target(service, str(HostPort(host, metrics_port)), container or "")


def replica_targets(results: Iterable[HopResult], metrics_port: int) -> list[Target]:
    """Every replica a health round found that serves a metrics listener (on
    SECUMAIL_METRICS_LISTEN's port): what /metrics scrapes and tracking collects from."""
    return [target_for(r.hop.service, replica.host, metrics_port, replica.name)
            for r in results if r.hop.metrics for replica in r.replicas if replica.host]


def relabel(families: Iterable[Metric], labels: dict[str, str]) -> list[Metric]:
    """Copies of `families` with `labels` on every sample; a label of the same name already
    there is kept as `exported_<name>` (Prometheus's own rule)."""
    relabelled = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            merged = {}
            for name, value in sample.labels.items():
                merged[f"exported_{name}" if name in labels else name] = value
            merged.update(labels)
            copy.samples.append(Sample(sample.name, merged, sample.value, None, None))
        relabelled.append(copy)
    return relabelled


def parse(text: str) -> list[Metric]:
    families = list(text_string_to_metric_families(text))
    # The text format turns each counter's and histogram's `_created` into a gauge family of
    # its own: series that say nothing a dashboard uses. Drop them.
    typed = {f.name for f in families if f.type in ("counter", "histogram", "summary")}
    return [f for f in families
            if not (f.name.endswith("_created") and f.name.removesuffix("_created") in typed)]


def merge(groups: Iterable[list[Metric]]) -> list[Metric]:
    """Families of the same name merged (the first one's type and help win; a replica that
    disagrees on the type is skipped for that family rather than breaking the output)."""
    merged: dict[str, Metric] = {}
    for families in groups:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = into = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif into.type != family.type:
                log_event(log, "metric type conflict", logging.WARNING, metric=family.name,
                          types=f"{into.type}/{family.type}")
                continue
            into.samples.extend(family.samples)
    return sorted(merged.values(), key=lambda m: m.name)


async def scrape(client: httpx2.AsyncClient, target: Target, timeout: float) -> Scrape:
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await client.get(target.url, timeout=timeout)
        response.raise_for_status()
        families = parse(response.text)
    except (httpx2.HTTPError, ValueError) as error:
        return Scrape(target, [], f"{type(error).__name__}: {error}", loop.time() - started)
    return Scrape(target, relabel(families, target.labels), None, loop.time() - started)


async def scrape_all(client: httpx2.AsyncClient, targets: list[Target], timeout: float
                     ) -> list[Scrape]:
    return list(await asyncio.gather(*(scrape(client, t, timeout) for t in targets)))


def up_family(scrapes: list[Scrape]) -> Metric:
    family = Metric("secumail_up", "1 when the gateway could scrape a replica's metrics",
                    "gauge")
    for item in scrapes:
        family.samples.append(Sample("secumail_up", item.target.labels, 0 if item.error else 1,
                                     None, None))
    return family


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(families: list[Metric]) -> bytes:
    """The text exposition format (what Prometheus and prometheus_client speak)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def own_families(registry: CollectorRegistry, instance: str) -> list[Metric]:
    """The gateway's own registry, labelled like every other replica."""
    families = parse(generate_latest(registry).decode())
    return relabel(families, {"service": "gateway", "instance": instance, "container": instance})
