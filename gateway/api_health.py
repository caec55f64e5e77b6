"""Health, readiness, metrics and the chain probe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from gateway.auth import Guard
from gateway.canary import ProbeOutcome
from gateway.health import HopResult
from gateway.models import (
    Alive,
    FailingHop,
    HealthReport,
    ProbeReport,
    Problem,
    Readiness,
    ReplicaHealth,
    ServiceHealth,
)
from gateway.scrape import (
    CONTENT_TYPE,
    merge,
    own_families,
    render,
    scrape_all,
    target_for,
    up_family,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

# How old a round of probes may be when reused: /readyz and /health stay close to live;
# /metrics answers from the last round and starts a new one when it is older than this.
READY_MAX_AGE = 1.0
METRICS_MAX_AGE = 10.0

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong bearer token"}
}


def _guarded(guard: Guard | None) -> dict[str, Any]:
    if guard is None:
        return {"dependencies": [], "responses": {}}
    return {"dependencies": [Depends(guard)], "responses": UNAUTHORIZED}


def probe_report(outcome: ProbeOutcome) -> ProbeReport:
    return ProbeReport(
        ok=outcome.ok, token=outcome.token, recipient=outcome.recipient,
        started_at=outcome.started_at, finished_at=outcome.finished_at, queued=outcome.queued,
        delivered_at=outcome.delivered_at, end_to_end_seconds=outcome.end_to_end_seconds,
        headers=outcome.headers, missing=outcome.missing, error=outcome.error,
    )


def service_health(result: HopResult) -> ServiceHealth:
    return ServiceHealth(
        service=result.hop.service, address=result.hop.address, check=result.hop.check,
        status="ok" if result.ok else "failing", error=result.error,
        replicas=[
            ReplicaHealth(
                instance=r.instance, name=r.name,
                status="ok" if r.status == "ok" else "failing" if r.status == "failing"
                else "unknown",
                latency_seconds=r.latency_seconds, answer=r.answer, last_error=r.last_error,
                last_error_at=r.last_error_at, last_ok_at=r.last_ok_at,
            )
            for r in result.replicas
        ],
    )


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
            labels = {"service": name, "instance": r.instance}
            replica.samples.append(Sample(replica.name, labels, int(r.status == "ok"),
                                          None, None))
            if r.latency_seconds is not None:
                latency.samples.append(Sample(latency.name, labels, r.latency_seconds,
                                              None, None))
    return [service, replica, latency]


def router(gateway: Gateway, guard: Guard | None) -> APIRouter:
    api = APIRouter(tags=["health and metrics"])
    guarded = _guarded(guard)

    @api.get("/healthz", response_model=Alive, summary="The gateway itself is alive")
    async def healthz() -> Alive:
        return Alive()

    @api.get(
        "/readyz", response_model=Readiness, summary="Every hop of the chain is ready",
        responses={503: {"model": Readiness, "description": "A hop is not ready"},
                   **guarded["responses"]},
        dependencies=guarded["dependencies"],
    )
    async def readyz() -> Any:
        results = await gateway.checker.check(max_age=READY_MAX_AGE)
        failing = [FailingHop(service=r.hop.service, error=r.problem)
                   for r in results if not r.ok]
        if failing:
            body = Readiness(status="not ready", failing=failing)
            return JSONResponse(body.model_dump(), status_code=503)
        return Readiness(status="ready", failing=[])

    @api.get(
        "/health", response_model=HealthReport,
        summary="Every service and replica: status, probe latency, last error",
        responses=guarded["responses"], dependencies=guarded["dependencies"],
    )
    async def health() -> HealthReport:
        results = await gateway.checker.check(max_age=READY_MAX_AGE)
        last = gateway.probe.last
        return HealthReport(
            status="ok" if all(r.ok for r in results) else "failing",
            checked_at=gateway.checker.checked_at,
            services=[service_health(r) for r in results],
            probe=probe_report(last) if last else None,
        )

    @api.get(
        "/metrics", response_class=Response,
        summary="The whole stack's metrics in the Prometheus text format",
        description="The gateway's own metrics and every replica's, labelled by service and "
        "instance. Scrape with `honor_labels: true`.",
        responses={200: {"content": {"text/plain": {}},
                         "description": "Prometheus text exposition format 0.0.4"},
                   **guarded["responses"]},
        dependencies=guarded["dependencies"],
    )
    async def metrics() -> Response:
        results = await gateway.checker.latest(max_age=METRICS_MAX_AGE)
        port = gateway.settings.metrics_listen.port
        targets = [target_for(r.hop.service, replica.host, port)
                   for r in results if r.hop.metrics for replica in r.replicas if replica.host]
        scrapes = await scrape_all(gateway.client, targets, gateway.settings.gateway_timeout)
        families = merge([
            own_families(gateway.registry, gateway.instance),
            *(s.families for s in scrapes),
            [up_family(scrapes)], hop_families(results),
        ])
        return Response(render(families), media_type=CONTENT_TYPE)

    @api.get(
        "/probe", response_model=ProbeReport, summary="The last chain probe's result",
        responses={404: {"model": Problem, "description": "No chain probe ran yet"},
                   **guarded["responses"]},
        dependencies=guarded["dependencies"],
    )
    async def last_probe() -> Any:
        if gateway.probe.last is None:
            return JSONResponse({"detail": "no chain probe ran yet"}, status_code=404)
        return probe_report(gateway.probe.last)

    return api


def probe_router(gateway: Gateway, guard: Guard) -> APIRouter:
    api = APIRouter(tags=["health and metrics"], dependencies=[Depends(guard)],
                    responses=UNAUTHORIZED)

    @api.post(
        "/probe", response_model=ProbeReport,
        summary="Send a canary through the whole chain now and wait for it",
        responses={503: {"model": ProbeReport, "description": "The canary did not arrive "
                         "with every hop's header"}},
    )
    async def run_probe() -> Any:
        report = probe_report(await gateway.probe.run())
        if not report.ok:
            return JSONResponse(report.model_dump(), status_code=503)
        return report

    return api
