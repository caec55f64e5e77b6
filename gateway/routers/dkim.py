"""DKIM keys: list them with their records, generate one, activate a selector."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, HTTPException

from gateway.context import GatewayDep, invalid, problem
from gateway.models import DkimActivation, DkimKey, KeygenReport, KeygenRequest
from secumail import dkim_keys, dkim_rotation
from secumail.logs import log_event
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

router = APIRouter(prefix="/admin/dkim", tags=["dkim"])


@router.get("/keys", response_model=list[DkimKey],
            summary="Every domain's selectors, which sign, and the DNS record to publish")
async def list_dkim(gateway: GatewayDep) -> list[DkimKey]:
    return await asyncio.to_thread(listed_keys, gateway.settings)


def listed_keys(settings: Settings) -> list[DkimKey]:
    """Every key with its role (rotation) and record: the API, /health (the records to
    publish) and the console's DKIM page."""
    keys_dir = Path(settings.dkim_keys_dir)
    listed = dkim_keys.list_keys(keys_dir)
    states = dkim_rotation.key_states(keys_dir, listed)
    roles = dkim_rotation.roles(states, settings.dkim_rotate_days)
    found = []
    for k in listed:
        role = roles.get((k.domain, k.selector))
        removable = None
        if role == "retired":
            since = dkim_rotation.activated_at(keys_dir, k.domain)
            removable = since + settings.dkim_retired_days * dkim_rotation.DAY if since else None
        found.append(DkimKey(
            domain=k.domain, selector=k.selector, key_type=k.key_type, active=k.active,
            record_name=k.record_name, record_value=k.record_value, error=k.error or None,
            role=role, removable_after=removable))
    return found


@router.post("/keys", response_model=KeygenReport, status_code=201,
             summary="Generate a key; publish its record, then activate it",
             responses={409: problem("That selector exists already")})
async def generate_dkim(request: KeygenRequest, gateway: GatewayDep) -> KeygenReport:
    try:
        made = await asyncio.to_thread(
            dkim_keys.keygen, Path(gateway.settings.dkim_keys_dir), request.domain,
            request.selector, request.key_type, request.bits, request.activate,
        )
    except FileExistsError:
        raise HTTPException(409, "that selector exists already for this domain") from None
    except ValueError as error:
        raise invalid(("body",), error) from None
    log_event(log, "dkim key generated", domain=made.domain, selector=made.selector,
              type=request.key_type, activated=made.activated)
    return KeygenReport(domain=made.domain, selector=made.selector, key_type=request.key_type,
                        activated=made.activated, record_name=made.record_name,
                        record_value=made.record_value, zone_line=made.zone_line)


@router.post("/keys/{domain}/{selector}/activate", response_model=DkimActivation,
             summary="Sign with this selector from now on (the milter sees it within a "
             "second)", responses={404: problem("No such key")})
async def activate_dkim(domain: str, selector: str, gateway: GatewayDep) -> DkimActivation:
    try:
        domain, selector = dkim_keys.check_domain(domain), dkim_keys.check_selector(selector)
        active = await asyncio.to_thread(dkim_keys.activate, Path(gateway.settings.dkim_keys_dir),
                                         domain, selector)
    except dkim_keys.KeyUnusable:
        raise HTTPException(404, "no usable key with that selector") from None
    except ValueError as error:
        raise invalid(("path",), error) from None
    log_event(log, "dkim key activated", domain=domain, selector=selector)
    return DkimActivation(domain=domain, active=active)
