"""Liveness, readiness, every hop's health, and the last chain probe."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.canary import ProbeOutcome
from gateway.context import GatewayDep, problem
from gateway.health import HopResult
from gateway.models import (
    Alive,
    DkimKey,
    FailingHop,
    HealthReport,
    ProbeReport,
    Readiness,
    ReplicaHealth,
    ServiceHealth,
)
from gateway.routers.dkim import listed_keys
from gateway.spamassassin import BayesState, RulesState, read_state, status_path
from secumail.settings import Settings

# How old a round of probes may be when reused: /readyz and /health stay close to live.
READY_MAX_AGE = 1.0

# /healthz is never guarded: container healthchecks ask it.
liveness = APIRouter(tags=["health and metrics"])
router = APIRouter(tags=["health and metrics"])


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


@liveness.get("/healthz", response_model=Alive, summary="The gateway itself is alive")
async def healthz() -> Alive:
    return Alive()


@router.get("/readyz", response_model=Readiness, summary="Every hop of the chain is ready",
            responses={503: {"model": Readiness, "description": "A hop is not ready"}})
async def readyz(gateway: GatewayDep) -> Any:
    results = await gateway.checker.check(max_age=READY_MAX_AGE)
    failing = [FailingHop(service=r.hop.service, error=r.problem) for r in results if not r.ok]
    if failing:
        body = Readiness(status="not ready", failing=failing)
        return JSONResponse(body.model_dump(), status_code=503)
    return Readiness(status="ready", failing=[])


@router.get("/health", response_model=HealthReport,
            summary="Every service and replica: status, probe latency, last error")
async def health(gateway: GatewayDep) -> HealthReport:
    results = await gateway.checker.check(max_age=READY_MAX_AGE)
    last = gateway.probe.last
    # One verdict for the whole report: every replica answers and the last canary (if one
    # ran) came through.
    ok = all(r.ok for r in results) and (last is None or last.ok)
    return HealthReport(
        status="ok" if ok else "failing",
        checked_at=gateway.checker.checked_at,
        services=[service_health(r) for r in results],
        probe=probe_report(last) if last else None,
        bayes=await asyncio.to_thread(
            read_state, status_path(gateway.settings.spamassassin_address, "bayes"), BayesState),
        spamassassin_rules=await asyncio.to_thread(
            read_state, status_path(gateway.settings.spamassassin_address, "rules"), RulesState),
        dkim_awaiting_record=await asyncio.to_thread(awaiting_record, gateway.settings),
    )


def awaiting_record(settings: Settings) -> list[DkimKey]:
    """The keys whose record the admin must publish (a rotation's successors)."""
    try:
        return [k for k in listed_keys(settings) if k.role == "awaiting-record"]
    except OSError:  # no keys volume here: nothing to publish
        return []


@router.get("/probe", response_model=ProbeReport, summary="The last chain probe's result",
            responses={404: problem("No chain probe ran yet")})
async def last_probe(gateway: GatewayDep) -> Any:
    if gateway.probe.last is None:
        return JSONResponse({"detail": "no chain probe ran yet"}, status_code=404)
    return probe_report(gateway.probe.last)


# --- the admin's: a canary now ------------------------------------------------------------

run = APIRouter(tags=["health and metrics"])


@run.post("/probe", response_model=ProbeReport,
          summary="Send a canary through the whole chain now and wait for it",
          responses={503: {"model": ProbeReport, "description": "The canary did not arrive "
                           "with every hop's header"}})
async def run_probe(gateway: GatewayDep) -> Any:
    report = probe_report(await gateway.probe.run())
    if not report.ok:
        return JSONResponse(report.model_dump(), status_code=503)
    return report
