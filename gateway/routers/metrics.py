"""/metrics: the gateway's own metrics and every replica's, labelled by service, instance
(address) and container (name, as /health shows it)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from gateway.context import GatewayDep
from gateway.health import HopResult
from gateway.scrape import (
    CONTENT_TYPE,
    merge,
    own_families,
    render,
    replica_targets,
    scrape_all,
    up_family,
)

# /metrics answers from the last round of probes and starts a new one when it is older.
METRICS_MAX_AGE = 10.0

router = APIRouter(tags=["health and metrics"])


def hop_families(results: list[HopResult]) -> list[Metric]:
    service = Metric("secumail_service_ready",
                     "1 when the hop resolves and every replica answers its probe", "gauge")
    replica = Metric("secumail_replica_ready", "1 when the replica answers its probe", "gauge")
    latency = Metric("secumail_replica_probe_duration_seconds",
                     "How long the replica's last probe took", "gauge")
    for result in results:
        name = result.hop.service
        service.samples.append(Sample(service.name, {"service": name}, int(result.ok),
                                      None, None))
        for r in result.replicas:
            labels = {"service": name, "instance": r.instance,
                      "container": r.name or r.instance}
            replica.samples.append(Sample(replica.name, labels, int(r.status == "ok"),
                                          None, None))
            if r.latency_seconds is not None:
                latency.samples.append(Sample(latency.name, labels, r.latency_seconds,
                                              None, None))
    return [service, replica, latency]


@router.get(
    "/metrics", response_class=Response,
    summary="The whole stack's metrics in the Prometheus text format",
    description="The gateway's own metrics and every replica's, labelled by service, "
    "instance (address) and container (the name /health shows). Scrape with "
    "`honor_labels: true`.",
    responses={200: {"content": {"text/plain": {}},
                     "description": "Prometheus text exposition format 0.0.4"}},
)
async def metrics(gateway: GatewayDep) -> Response:
    results = await gateway.checker.latest(max_age=METRICS_MAX_AGE)
    targets = replica_targets(results, gateway.settings.metrics_listen.port)
    scrapes = await scrape_all(gateway.client, targets, gateway.settings.gateway_timeout)
    families = merge([
        own_families(gateway.registry, gateway.instance),
        *(s.families for s in scrapes),
        [up_family(scrapes)], hop_families(results),
    ])
    return Response(render(families), media_type=CONTENT_TYPE)
