"""Every gateway route through FastAPI's test client, with fakes where the network would be
(replica resolution, probes, scrapes, the canary's SMTP session, the release's next hop):
answers, 401s and 404s, and that each answer is one the OpenAPI document announces, with
the body its model describes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter
from starlette.routing import Match

from gateway.app import create_app
from gateway.health import chain_hops
from gateway.quarantine import QuarantineAdmin
from gateway.tracking import StoredEvent, TrackingStore
from secumail import dkim_keys, tracking
from secumail.backend import BackendError
from secumail.greylist_store import GreylistStore, SqliteStore
from secumail.netaddr import HostPort
from secumail.outbound import Held
from secumail.outbound_store import SqliteOutbound
from secumail.protocols.smtp import SmtpReply
from secumail.quarantine import Quarantine, QuarantineRecord
from secumail.settings import Settings

ADMIN = "admin-token-0123456789"
METRICS = "metrics-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
HEADERS_ADDED = ["Received-SPF", "Authentication-Results", "X-AV-Checked", "X-Spam-Status"]

REPLICAS = {
    "postfix:25": ["10.0.0.2:25"],
    "policy:10023": ["10.0.0.3:10023"],
    "dkim:10028": ["10.0.0.4:10028"],
    "clamav:10025": ["10.0.1.1:10025", "10.0.1.2:10025", "10.0.1.3:10025"],
    "spamd:10026": ["10.0.1.4:10026"],
    "clamd:3310": ["10.0.2.1:3310"],
    "spamassassin:783": ["10.0.2.2:783"],
}


def exposition(name: str, labels: dict[str, str], value: float) -> str:
    """A replica's /metrics as prometheus_client writes it."""
    registry = CollectorRegistry()
    Counter(name, f"help of {name}", list(labels), registry=registry).labels(**labels).inc(value)
    return generate_latest(registry).decode()


@dataclass
class World:
    """What the fakes answer; tests change it between requests."""

    replicas: dict[str, list[str]] = field(default_factory=lambda: dict(REPLICAS))
    failing: dict[str, str] = field(default_factory=dict)  # instance -> error
    metrics: dict[str, str] = field(default_factory=dict)  # "ip:9100" -> exposition
    canaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    canary_headers: list[str] | None = field(default_factory=lambda: list(HEADERS_ADDED))
    refuse_canary: str = ""
    released: list[tuple[HostPort, QuarantineRecord, bytes]] = field(default_factory=list)
    learned: list[tuple[bytes, str]] = field(default_factory=list)
    spamd_down: bool = False
    release_reply: SmtpReply = field(
        default_factory=lambda: SmtpReply(250, ("2.0.0 Ok: queued as 4F2A",)))
    offset: float = 0.0  # seconds the gateway's clock is ahead of the real one

    def clock(self) -> float:
        return time.time() + self.offset

    async def resolve(self, address: str) -> list[str]:
        if address not in self.replicas:
            raise OSError(f"[Errno -2] Name or service not known: {address}")
        return self.replicas[address]

    async def probe(self, instance: str, timeout: float) -> str:
        if instance in self.failing:
            raise ConnectionError(self.failing[instance])
        return "220 ok"

    async def namer(self, ip: str) -> str | None:
        return f"replica-{ip}"

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        host = f"{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            if host not in self.metrics:
                raise httpx2.ConnectError("Connection refused", request=request)
            return httpx2.Response(200, text=self.metrics[host])
        token = request.url.path.removeprefix("/probe/")
        if host != "postfix:9100" or token == request.url.path:
            return httpx2.Response(404)
        if request.method == "DELETE":
            return httpx2.Response(204 if self.canaries.pop(token, None) else 404)
        found = self.canaries.get(token)
        return httpx2.Response(200, json=found) if found else httpx2.Response(404)

    async def send_canary(self, token: str, now: float) -> str:
        if self.refuse_canary:
            raise ValueError(self.refuse_canary)
        if self.canary_headers is not None:
            headers = [[name, "added"] for name in ["Received", *self.canary_headers]]
            self.canaries[token] = {"token": token, "delivered_at": now + 0.5,
                                    "headers": headers}
        return "250 2.0.0 Ok: queued as 3B1C"

    async def release(self, hop: HostPort, record: QuarantineRecord, message: bytes
                      ) -> SmtpReply:
        self.released.append((hop, record, message))
        return self.release_reply

    async def learn(self, message: bytes, kind: str) -> bool:
        """SpamAssassin's Bayes as spamd answers TELL: new, or known as that kind already."""
        if self.spamd_down:
            raise BackendError("spamd at /run/spamd/spamd.sock: connection refused")
        new = (message, kind) not in self.learned
        self.learned.append((message, kind))
        return new


def routes(app: FastAPI) -> Iterator[Any]:
    """The app's routes, those of included routers too (FastAPI keeps them wrapped)."""
    for route in app.routes:
        inner = getattr(route, "original_router", None)
        yield from (inner.routes if inner is not None else [route])


def check_documented(app: FastAPI, response: httpx2.Response) -> None:
    """The answer's status is in the OpenAPI document for its route, and its body fits the
    model announced for that status."""
    request = response.request
    scope = {"type": "http", "path": request.url.path, "method": request.method}
    route: Any = next((r for r in routes(app) if r.matches(scope)[0] == Match.FULL), None)
    if route is None:
        assert response.status_code in (404, 405), response.text
        return
    if not getattr(route, "include_in_schema", False):
        return  # /openapi.json, /docs
    operation = app.openapi()["paths"][route.path_format][request.method.lower()]
    status = response.status_code
    assert str(status) in operation["responses"], (route.path_format, status, response.text)
    if status == 422:
        assert isinstance(response.json()["detail"], list)
        return
    model = route.response_model if 200 <= status < 300 else (
        route.responses.get(status, {}).get("model")
    )
    if model is not None and response.headers.get("content-type") == "application/json":
        TypeAdapter(model).validate_python(response.json())


class Client:
    def __init__(self, client: TestClient, app: FastAPI) -> None:
        self.client, self.app = client, app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx2.Response:
        response = self.client.request(method, url, **kwargs)
        check_documented(self.app, response)
        return response

    def get(self, url: str, **kwargs: Any) -> httpx2.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx2.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx2.Response:
        return self.request("DELETE", url, **kwargs)


@dataclass
class Gateway:
    client: Client
    world: World
    settings: Settings
    store: SqliteStore


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(world: World | None = None, store_fails: bool = False, **overrides: Any
             ) -> Gateway:
        world = world or World()
        values: dict[str, Any] = {
            "admin_token": ADMIN, "domains": ["secumail.test"], "hostname": "mx.secumail.test",
            "probe_mailbox": "probe@secumail.test", "probe_interval": 0, "probe_timeout": 0.5,
            "quarantine_dir": str(tmp_path / "quarantine"),
            "dkim_keys_dir": str(tmp_path / "dkim"), "gateway_timeout": 1,
            "greylist_whitelist_clients": ["198.51.100.0/24"],
            # Scanners over TCP here, so that a name can fail to resolve (compose: sockets).
            "clamd_address": "clamd:3310", "spamassassin_address": "spamassassin:783",
            "gateway_hosts": ["testserver"],  # the name FastAPI's test client sends
            "tracking": False,  # its collector would start health rounds of its own
            **overrides,
        }
        settings = Settings(**values)
        store = SqliteStore(":memory:")

        def open_store() -> GreylistStore:
            if store_fails:
                raise OSError("unable to open database file")
            return store

        hops = [replace(hop, probe=world.probe) for hop in chain_hops(settings)]
        app = create_app(
            settings, resolve=world.resolve, namer=world.namer,
            transport=httpx2.MockTransport(world.handle), store=open_store,
            hostname="gateway-1", hops=hops, canary_send=world.send_canary,
            release_send=world.release, learn=world.learn, clock=world.clock,
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Gateway(Client(client, app), world, settings, store)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def gw(make_gateway: Any) -> Gateway:
    gateway: Gateway = make_gateway()
    return gateway


# --- health -------------------------------------------------------------------------------


def test_healthz_is_always_open(make_gateway: Any) -> None:
    gateway = make_gateway(metrics_token=METRICS)
    assert gateway.client.get("/healthz").json() == {"status": "alive"}


def test_readyz_is_200_when_every_hop_answers(gw: Gateway) -> None:
    response = gw.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "failing": []}


def test_readyz_is_503_naming_the_broken_hop(gw: Gateway) -> None:
    gw.world.failing["10.0.2.1:3310"] = "Connection refused"
    gw.world.offset += 1.1  # past the age a round of probes is reused for
    response = gw.client.get("/readyz")
    assert response.status_code == 503
    [failing] = response.json()["failing"]
    assert failing["service"] == "clamd"
    assert "Connection refused" in failing["error"] and "replica-10.0.2.1" in failing["error"]


def test_readyz_is_503_when_a_service_name_does_not_resolve(make_gateway: Any) -> None:
    world = World()
    del world.replicas["spamassassin:783"]
    response = make_gateway(world).client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failing"] == [
        {"service": "spamassassin",
         "error": "cannot resolve spamassassin:783: OSError: [Errno -2] Name or service not "
                  "known: spamassassin:783"}
    ]


def test_one_failing_replica_of_three_makes_its_hop_not_ready(gw: Gateway) -> None:
    gw.world.failing["10.0.1.2:10025"] = "EHLO answered '421 busy'"
    response = gw.client.get("/readyz")
    assert response.status_code == 503
    assert [f["service"] for f in response.json()["failing"]] == ["clamav"]


def test_health_lists_every_replica_and_keeps_the_last_error(gw: Gateway) -> None:
    gw.world.failing["10.0.1.3:10025"] = "timed out"
    first = gw.client.get("/health").json()
    assert first["status"] == "failing"
    services = {s["service"]: s for s in first["services"]}
    assert list(services) == ["postfix", "policy", "dkim", "clamav", "spamd", "clamd",
                              "spamassassin"]
    clamav = services["clamav"]
    assert clamav["check"] == "EHLO" and clamav["address"] == "clamav:10025"
    assert [r["instance"] for r in clamav["replicas"]] == REPLICAS["clamav:10025"]
    assert [r["status"] for r in clamav["replicas"]] == ["ok", "ok", "failing"]
    assert clamav["replicas"][0]["name"] == "replica-10.0.1.1"
    assert all(r["latency_seconds"] >= 0 for r in clamav["replicas"])
    assert clamav["replicas"][2]["last_error"] == "ConnectionError: timed out"
    del gw.world.failing["10.0.1.3:10025"]
    gw.world.offset += 1.1
    again = gw.client.get("/health").json()
    recovered = next(s for s in again["services"] if s["service"] == "clamav")["replicas"][2]
    assert again["status"] == "ok" and recovered["status"] == "ok"
    assert recovered["last_error"] == "ConnectionError: timed out"
    assert recovered["last_ok_at"] >= recovered["last_error_at"]


def test_health_names_why_clamd_cannot_serve(make_gateway: Any, tmp_path: Path) -> None:
    """clamd's container, waiting for signatures it cannot download, writes why beside its
    socket (services/clamav/clamd-entrypoint.sh): /health and /readyz say it."""
    socket_path = tmp_path / "run-clamav" / "clamd.sock"
    socket_path.parent.mkdir()
    world = World()
    world.replicas[str(socket_path)] = [str(socket_path)]
    world.failing[str(socket_path)] = "[Errno 2] No such file or directory"
    gateway = make_gateway(world, clamd_address=str(socket_path))
    why = "no ClamAV signatures: freshclam could not download them from ClamAV's mirror"
    (socket_path.parent / "status").write_text(why + "\n")
    gateway.world.offset += 1.1
    [failing] = gateway.client.get("/readyz").json()["failing"]
    assert failing["service"] == "clamd" and why in failing["error"], failing
    clamd = next(s for s in gateway.client.get("/health").json()["services"]
                 if s["service"] == "clamd")
    assert why in clamd["replicas"][0]["last_error"]


def test_a_scaled_down_replica_leaves_health(gw: Gateway) -> None:
    assert len(gw.client.get("/health").json()["services"][3]["replicas"]) == 3
    gw.world.replicas["clamav:10025"] = REPLICAS["clamav:10025"][:1]
    gw.world.offset += 1.1
    assert len(gw.client.get("/health").json()["services"][3]["replicas"]) == 1


def test_without_a_milter_address_there_is_no_dkim_hop(make_gateway: Any) -> None:
    gateway = make_gateway(dkim_milter_address="")
    names = [s["service"] for s in gateway.client.get("/health").json()["services"]]
    assert "dkim" not in names and len(names) == 6


# --- metrics ------------------------------------------------------------------------------


def scraped_world() -> World:
    world = World()
    for ip in ("10.0.1.1", "10.0.1.2"):  # 10.0.1.3 does not answer
        world.metrics[f"{ip}:9100"] = exposition(
            "secumail_filter_messages", {"filter": "clamav", "verdict": "clean"}, 5)
    world.metrics["10.0.0.3:9100"] = exposition(
        "secumail_policy_decisions", {"check": "greylist", "action": "defer"}, 3)
    world.metrics["10.0.0.2:9100"] = exposition(
        "secumail_postfix_deliveries", {"status": "sent", "via": "virtual"}, 7)
    # A replica whose own labels clash with the ones the gateway adds.
    world.metrics["10.0.1.4:9100"] = exposition(
        "secumail_filter_messages", {"filter": "spamd", "verdict": "ham", "instance": "x"}, 2)
    return world


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_metrics_gather_every_replica_labelled(make_gateway: Any) -> None:
    gateway = make_gateway(scraped_world())
    response = gateway.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(response.text)
    for ip in ("10.0.1.1", "10.0.1.2"):
        key = ("secumail_filter_messages_total", frozenset({
            ("filter", "clamav"), ("verdict", "clean"), ("service", "clamav"),
            ("instance", f"{ip}:9100"), ("container", f"replica-{ip}")}))
        assert found[key] == 5
    assert found[("secumail_postfix_deliveries_total", frozenset({
        ("status", "sent"), ("via", "virtual"), ("service", "postfix"),
        ("instance", "10.0.0.2:9100"), ("container", "replica-10.0.0.2")}))] == 7
    # One HELP and TYPE per family, whatever the number of replicas.
    assert response.text.count("# TYPE secumail_filter_messages_total counter") == 1
    assert found[("secumail_filter_messages_total", frozenset({
        ("filter", "spamd"), ("verdict", "ham"), ("exported_instance", "x"),
        ("service", "spamd"), ("instance", "10.0.1.4:9100"),
        ("container", "replica-10.0.1.4")}))] == 2
    # Labelled by address and by the container name /health shows.
    assert found[("secumail_up", frozenset({("service", "clamav"), ("instance", "10.0.1.3:9100"),
                                            ("container", "replica-10.0.1.3")}))] == 0
    assert found[("secumail_up", frozenset({("service", "clamav"), ("instance", "10.0.1.1:9100"),
                                            ("container", "replica-10.0.1.1")}))] == 1
    assert found[("secumail_service_ready", frozenset({("service", "clamd")}))] == 1
    assert found[("secumail_replica_ready", frozenset({
        ("service", "clamav"), ("instance", "10.0.1.3:10025"),
        ("container", "replica-10.0.1.3")}))] == 1
    # No scrape of the daemons without a metrics listener.
    assert not any(dict(labels).get("service") == "clamd"
                   for name, labels in found if name == "secumail_up")
    # The gateway's own metrics, under its own name.
    assert any(name == "process_cpu_seconds_total" and ("service", "gateway") in labels
               and ("instance", "gateway-1") in labels for name, labels in found)
    assert "_created" not in response.text


def test_metrics_count_the_gateways_own_requests(gw: Gateway) -> None:
    gw.client.get("/healthz")
    gw.client.get("/nowhere")
    found = samples(gw.client.get("/metrics").text)
    assert found[("secumail_gateway_requests_total", frozenset({
        ("route", "/healthz"), ("code", "200"), ("service", "gateway"),
        ("instance", "gateway-1"), ("container", "gateway-1")}))] == 1
    assert found[("secumail_gateway_requests_total", frozenset({
        ("route", "unmatched"), ("code", "404"), ("service", "gateway"),
        ("instance", "gateway-1"), ("container", "gateway-1")}))] == 1


@pytest.mark.parametrize("path", ["/metrics", "/health", "/readyz", "/probe"])
def test_metrics_token_guards_health_and_metrics(make_gateway: Any, path: str) -> None:
    gateway = make_gateway(metrics_token=METRICS)
    assert gateway.client.get(path).status_code == 401
    assert gateway.client.get(path, headers=AUTH).status_code == 401  # the admin token is not it
    assert gateway.client.get(f"{path}?token={METRICS}").status_code == 401
    answer = gateway.client.get(path, headers={"Authorization": f"Bearer {METRICS}"})
    assert answer.status_code in (200, 404)  # /probe: 404 until a probe ran


# --- chain probe --------------------------------------------------------------------------


def test_probe_sends_a_canary_and_finds_every_header(gw: Gateway) -> None:
    assert gw.client.get("/probe").status_code == 404
    response = gw.client.post("/probe", headers=AUTH)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ok"] and report["missing"] == [] and report["error"] is None
    assert report["headers"] == {"policy": True, "dkim": True, "clamav": True, "spamd": True}
    assert report["end_to_end_seconds"] == pytest.approx(0.5)
    assert report["queued"].startswith("250 ")
    assert report["recipient"] == "probe@secumail.test"
    assert gw.world.canaries == {}  # taken out of the mailbox
    assert gw.client.get("/probe").json() == report
    found = samples(gw.client.get("/metrics").text)
    assert found[("secumail_chain_probe_success", frozenset({
        ("service", "gateway"), ("instance", "gateway-1"),
        ("container", "gateway-1")}))] == 1
    assert found[("secumail_chain_probe_header_present", frozenset({
        ("hop", "spamd"), ("service", "gateway"), ("instance", "gateway-1"),
        ("container", "gateway-1")}))] == 1
    assert gw.client.get("/health").json()["probe"]["token"] == report["token"]


def test_probe_names_the_hop_whose_header_is_missing(gw: Gateway) -> None:
    gw.world.canary_headers = ["Received-SPF", "Authentication-Results", "X-AV-Checked"]
    response = gw.client.post("/probe", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["missing"] == ["spamd"]
    assert "spamd" in response.json()["error"]
    # /health's one status agrees with its own probe: every replica answers, yet it fails.
    health = gw.client.get("/health").json()
    assert health["probe"]["ok"] is False and health["status"] == "failing"
    assert all(s["status"] == "ok" for s in health["services"])


def test_probe_that_never_arrives_fails_after_its_timeout(gw: Gateway) -> None:
    gw.world.canary_headers = None
    report = gw.client.post("/probe", headers=AUTH).json()
    assert not report["ok"] and report["delivered_at"] is None
    assert report["error"] == "not in probe@secumail.test after 0.5 s"


def test_probe_refused_by_postfix_fails_with_the_reason(gw: Gateway) -> None:
    gw.world.refuse_canary = "Postfix refused RCPT: 550 5.1.1 User unknown"
    response = gw.client.post("/probe", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["error"] == "Postfix refused RCPT: 550 5.1.1 User unknown"


def test_expected_headers_follow_the_settings(make_gateway: Any) -> None:
    gateway = make_gateway(spf_enabled=False, dkim_milter_address="")
    report = gateway.client.post("/probe", headers=AUTH).json()
    assert report["headers"] == {"clamav": True, "spamd": True}


# --- admin authentication -----------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/probe", None),
    ("GET", "/admin/greylist/entries", None),
    ("DELETE", "/admin/greylist/entries/192.0.2.0/24/a@remote.test/bob@secumail.test", None),
    ("GET", "/admin/greylist/whitelist", None),
    ("POST", "/admin/greylist/whitelist", {"kind": "client", "value": "192.0.2.9"}),
    ("DELETE", "/admin/greylist/whitelist/recipient/abuse@", None),
    ("GET", "/admin/quarantine", None),
    ("GET", "/admin/quarantine/{id}", None),
    ("GET", "/admin/quarantine/{id}/message", None),
    ("POST", "/admin/quarantine/{id}/release", None),
    ("DELETE", "/admin/quarantine/{id}", None),
    ("GET", "/admin/dkim/keys", None),
    ("POST", "/admin/dkim/keys", {"domain": "secumail.test", "key_type": "ed25519"}),
    ("POST", "/admin/dkim/keys/secumail.test/s1/activate", None),
    ("GET", "/admin/tracking", None),
    ("GET", "/admin/outbound/held", None),
    ("GET", "/admin/mta-sts", None),
    ("DELETE", "/admin/outbound/held/sender:spam@secumail.test", None),
]


@dataclass(frozen=True)
class Envelope:
    mail_from: str = "alice@remote.test"
    rcpt_tos: tuple[str, ...] = ("bob@secumail.test",)
    client: dict[str, str] = field(default_factory=lambda: {
        "ADDR": "203.0.113.7", "NAME": "mail.remote.test", "HELO": "mail.remote.test"})


def quarantined(settings: Settings, filter_name: str = "clamav") -> str:
    message = b"Subject: kept\r\nFrom: alice@remote.test\r\n\r\nX5O!P%@AP\r\n"
    return Quarantine(settings.quarantine_dir).store(
        filter_name, Envelope(), message, "virus", "virus Eicar-Test-Signature")


def state(gateway: Gateway) -> tuple[object, ...]:
    """Everything an admin route could change."""
    quarantine = sorted(p.name for p in Path(gateway.settings.quarantine_dir).rglob("*"))
    dkim = sorted(p.name for p in Path(gateway.settings.dkim_keys_dir).rglob("*"))
    rows = gateway.store.db.execute("SELECT * FROM triplets").fetchall()
    whitelist = gateway.store.db.execute("SELECT * FROM whitelist").fetchall()
    SqliteOutbound(gateway.store)  # its tables, if the gateway made none yet
    held = gateway.store.db.execute("SELECT * FROM outbound_held").fetchall()
    return (quarantine, dkim, rows, whitelist, gateway.world.released, gateway.world.canaries,
            gateway.world.learned, held)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ADMIN_ROUTES])
@pytest.mark.parametrize("credentials", ["none", "wrong", "query", "basic", "query+header"])
def test_admin_routes_refuse_without_the_token_and_change_nothing(
    gw: Gateway, method: str, path: str, body: dict[str, str] | None, credentials: str
) -> None:
    ident = quarantined(gw.settings)
    gw.store.db.execute("INSERT INTO triplets VALUES "
                        "('192.0.2.0/24/a@remote.test/bob@secumail.test', 1, 2, 0)")
    gw.store.db.execute("INSERT INTO whitelist VALUES ('recipient', 'abuse@', 1)")
    asyncio.run(SqliteOutbound(gw.store).hold(Held("sender:spam@secumail.test", 1.0, "why")))
    before = state(gw)
    headers = {
        "none": {}, "query": {},
        "wrong": {"Authorization": f"Bearer {ADMIN[:-1]}x"},
        "basic": {"Authorization": f"Basic {ADMIN}"},
        "query+header": AUTH,
    }[credentials]
    url = path.replace("{id}", ident)
    if "query" in credentials:
        url += f"?token={ADMIN}"
    response = gw.client.request(method, url, headers=headers, json=body)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "missing or wrong bearer token"}
    assert state(gw) == before


def test_without_an_admin_token_there_is_no_admin_api(make_gateway: Any) -> None:
    gateway = make_gateway(admin_token="")
    assert gateway.client.get("/admin/quarantine", headers=AUTH).status_code == 404
    assert gateway.client.post("/probe", headers=AUTH).status_code == 405  # GET /probe only
    paths = gateway.client.app.openapi()["paths"]
    assert not [p for p in paths if p.startswith("/admin")]
    assert gateway.client.get("/readyz").status_code == 200


# --- MTA-STS -----------------------------------------------------------------------------


def test_our_mta_sts_policy_is_served_to_anyone_and_its_records_told_to_the_admin(
    make_gateway: Any,
) -> None:
    off = make_gateway()
    assert off.client.get("/.well-known/mta-sts.txt").status_code == 404
    assert off.client.get("/admin/mta-sts", headers=AUTH).json() == {
        "mode": "", "policy": "", "records": []}
    gateway = make_gateway(mta_sts_mode="enforce", mta_sts_mx=["mx.secumail.test",
                                                               "*.backup.secumail.test"])
    served = gateway.client.get("/.well-known/mta-sts.txt",
                                headers={"Host": "mta-sts.secumail.test"})
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
    assert served.text == ("version: STSv1\r\nmode: enforce\r\nmx: mx.secumail.test\r\n"
                           "mx: *.backup.secumail.test\r\nmax_age: 604800\r\n")
    # Only the policy's own host name is added; others are still refused (DNS rebinding).
    assert gateway.client.client.get("/healthz", headers={"Host": "evil.test"}).status_code == 400
    report = gateway.client.get("/admin/mta-sts", headers=AUTH).json()
    assert report["policy"] == served.text
    [announce, host, tls] = report["records"]
    assert announce["name"] == "_mta-sts.secumail.test" and announce["type"] == "TXT"
    assert re.fullmatch(r"v=STSv1; id=[0-9a-f]{20}", announce["value"])
    assert (host["name"], host["type"], host["value"]) == (
        "mta-sts.secumail.test", "CNAME", "mx.secumail.test.")
    assert tls == {"name": "_smtp._tls.secumail.test", "type": "TXT",
                   "value": "v=TLSRPTv1; rua=mailto:postmaster@secumail.test",
                   "why": tls["why"]}
    testing = make_gateway(mta_sts_mode="testing").client.get(
        "/admin/mta-sts", headers=AUTH).json()
    assert testing["records"][0]["value"] != announce["value"]  # another policy, another id
    with pytest.raises(ValueError, match="not a host name"):
        Settings(mta_sts_mx=["mx..bad"])


# --- outbound -----------------------------------------------------------------------------


def test_held_senders_are_listed_and_released(gw: Gateway) -> None:
    outbound = SqliteOutbound(gw.store)
    asyncio.run(outbound.hold(Held("sender:spam@secumail.test", 1700000000.0,
                                   "over 10 times sender:messages:100/hour")))
    listed = gw.client.get("/admin/outbound/held", headers=AUTH).json()
    assert listed == [{"subject": "sender:spam@secumail.test", "scope": "sender",
                       "value": "spam@secumail.test", "since": 1700000000.0,
                       "reason": "over 10 times sender:messages:100/hour", "notified": False}]
    url = "/admin/outbound/held/sender:spam@secumail.test"
    assert gw.client.delete(url, headers=AUTH).status_code == 204
    assert gw.client.delete(url, headers=AUTH).status_code == 404
    assert gw.client.get("/admin/outbound/held", headers=AUTH).json() == []


# --- greylist -----------------------------------------------------------------------------


def test_greylist_entries_are_listed_filtered_and_deleted(gw: Gateway) -> None:
    for key, last in [("192.0.2.0/24/a@remote.test/bob@secumail.test", 20.0),
                      ("2001:db8::/64/<>/postmaster@secumail.test", 30.0)]:
        gw.store.db.execute("INSERT INTO triplets VALUES (?, 10, ?, 1)", (key, last))
    entries = gw.client.get("/admin/greylist/entries", headers=AUTH).json()
    assert [e["key"] for e in entries] == ["2001:db8::/64/<>/postmaster@secumail.test",
                                           "192.0.2.0/24/a@remote.test/bob@secumail.test"]
    assert entries[1] | {"key": ""} == {
        "key": "", "network": "192.0.2.0/24", "sender": "a@remote.test",
        "recipient": "bob@secumail.test", "first_seen": 10.0, "last_seen": 20.0,
        "passed": True, "state": "passed"}
    assert entries[0]["network"] == "2001:db8::/64" and entries[0]["sender"] == "<>"
    only = gw.client.get("/admin/greylist/entries?match=A@Remote&limit=5", headers=AUTH).json()
    assert [e["sender"] for e in only] == ["a@remote.test"]
    assert len(gw.client.get("/admin/greylist/entries?limit=1", headers=AUTH).json()) == 1
    assert gw.client.get("/admin/greylist/entries?limit=0", headers=AUTH).status_code == 422
    url = "/admin/greylist/entries/192.0.2.0/24/a@remote.test/bob@secumail.test"
    assert gw.client.delete(url, headers=AUTH).status_code == 204
    assert gw.client.delete(url, headers=AUTH).status_code == 404
    assert len(gw.client.get("/admin/greylist/entries", headers=AUTH).json()) == 1


def test_whitelist_shows_settings_and_adds_and_removes_entries(gw: Gateway) -> None:
    listed = gw.client.get("/admin/greylist/whitelist", headers=AUTH).json()["entries"]
    assert {"kind": "client", "value": "198.51.100.0/24", "added": None,
            "source": "settings"} in listed
    assert {"kind": "recipient", "value": "probe@secumail.test", "added": None,
            "source": "settings"} in listed
    added = gw.client.post("/admin/greylist/whitelist", headers=AUTH,
                           json={"kind": "client", "value": "192.0.2.9"})
    assert added.status_code == 201
    assert added.json()["value"] == "192.0.2.9/32" and added.json()["source"] == "admin"
    again = gw.client.post("/admin/greylist/whitelist", headers=AUTH,
                           json={"kind": "client", "value": "192.0.2.9/32"})
    assert again.status_code == 200
    assert gw.store.db.execute("SELECT kind, value FROM whitelist").fetchall() == [
        ("client", "192.0.2.9/32")]
    bad = gw.client.post("/admin/greylist/whitelist", headers=AUTH,
                         json={"kind": "recipient", "value": "@nowhere"})
    assert bad.status_code == 422 and "not an address" in bad.json()["detail"][0]["msg"]
    assert gw.client.post("/admin/greylist/whitelist", headers=AUTH,
                          json={"kind": "sender", "value": "x"}).status_code == 422
    url = "/admin/greylist/whitelist/client/192.0.2.9/32"
    assert gw.client.delete(url, headers=AUTH).status_code == 204
    assert gw.client.delete(url, headers=AUTH).status_code == 404
    settings_entry = "/admin/greylist/whitelist/client/198.51.100.0/24"
    assert gw.client.delete(settings_entry, headers=AUTH).status_code == 404
    assert gw.client.delete("/admin/greylist/whitelist/client/no%20such",
                            headers=AUTH).status_code == 404


def test_an_unreachable_store_is_503(make_gateway: Any) -> None:
    gateway = make_gateway(store_fails=True)
    response = gateway.client.get("/admin/greylist/entries", headers=AUTH)
    assert response.status_code == 503
    assert response.json() == {"detail": "the greylist store cannot be opened"}


# --- quarantine ---------------------------------------------------------------------------


def test_quarantine_lists_shows_and_serves_the_message(gw: Gateway) -> None:
    virus = quarantined(gw.settings, "clamav")
    spam = quarantined(gw.settings, "spamd")
    listed = gw.client.get("/admin/quarantine", headers=AUTH).json()
    assert {item["id"] for item in listed} == {virus, spam}
    only = gw.client.get("/admin/quarantine?filter=spamd", headers=AUTH).json()
    assert [item["id"] for item in only] == [spam]
    assert gw.client.get("/admin/quarantine?filter=../x", headers=AUTH).status_code == 422
    detail = gw.client.get(f"/admin/quarantine/{virus}", headers=AUTH).json()
    assert detail["mail_from"] == "alice@remote.test" and detail["verdict"] == "virus"
    assert detail["client"]["ADDR"] == "203.0.113.7"
    assert ["Subject", "kept"] in detail["headers"]
    raw = gw.client.get(f"/admin/quarantine/{virus}/message", headers=AUTH)
    assert raw.headers["content-type"] == "message/rfc822"
    assert raw.content.startswith(b"Subject: kept\r\n")


@pytest.mark.parametrize("ident", ["20261128T000000-000000000000", "..%2F..%2Fetc%2Fpasswd",
                                   "not-an-id"])
@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("GET", "/message"),
                                                ("POST", "/release"), ("DELETE", "")])
def test_unknown_quarantine_ids_are_404(gw: Gateway, ident: str, method: str, suffix: str
                                        ) -> None:
    quarantined(gw.settings)
    response = gw.client.request(method, f"/admin/quarantine/{ident}{suffix}", headers=AUTH)
    assert response.status_code == 404
    assert gw.world.released == []


def test_release_goes_to_the_next_hop_of_the_filter_that_kept_it(gw: Gateway) -> None:
    virus, spam = quarantined(gw.settings, "clamav"), quarantined(gw.settings, "spamd")
    response = gw.client.post(f"/admin/quarantine/{virus}/release", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": virus, "released": True, "next_hop": "spamd:10026",
                               "reply": "250 2.0.0 Ok: queued as 4F2A",
                               "learned": "learned as ham"}
    hop, record, message = gw.world.released[0]
    assert hop == HostPort("spamd", 10026) and record.rcpt_tos == ("bob@secumail.test",)
    # Released, and still saying why it was kept: a released virus says it is one.
    assert message.startswith(f"X-SecuMail-Released: {virus} by the gateway; kept by the "
                              f"clamav filter as virus: ".encode())
    assert gw.client.get(f"/admin/quarantine/{virus}", headers=AUTH).status_code == 404
    gw.client.post(f"/admin/quarantine/{spam}/release", headers=AUTH)
    assert gw.world.released[1][0] == HostPort("postfix", 10027)


def test_a_release_teaches_bayes_ham_unless_told_not_to(gw: Gateway) -> None:
    """Issue 29: a release taught nothing (mailcow learns ham on every release)."""
    first, second, third = (quarantined(gw.settings, "spamd") for _ in range(3))
    kept = gw.client.get(f"/admin/quarantine/{first}/message", headers=AUTH).content
    assert gw.client.post(f"/admin/quarantine/{first}/release", headers=AUTH
                          ).json()["learned"] == "learned as ham"
    assert gw.world.learned == [(kept, "ham")]  # as kept: without the release header
    quiet = gw.client.post(f"/admin/quarantine/{second}/release?learn=false", headers=AUTH)
    assert quiet.json()["learned"] == "not learned: released without learning"
    assert len(gw.world.learned) == 1
    gw.world.spamd_down = True  # the release stands; learning says why it did not
    down = gw.client.post(f"/admin/quarantine/{third}/release", headers=AUTH)
    assert down.status_code == 200 and down.json()["learned"].startswith(
        "not learned: spamd at /run/spamd/spamd.sock")


def test_the_admin_teaches_a_quarantined_or_uploaded_message(gw: Gateway) -> None:
    ident = quarantined(gw.settings, "spamd")
    learned = gw.client.post(f"/admin/quarantine/{ident}/learn?kind=spam", headers=AUTH)
    assert learned.json() == {"kind": "spam", "learned": "learned as spam"}
    assert gw.client.get(f"/admin/quarantine/{ident}", headers=AUTH).status_code == 200  # kept
    again = gw.client.post(f"/admin/quarantine/{ident}/learn?kind=spam", headers=AUTH)
    assert again.json()["learned"] == "known as spam already"
    spam = b"From: a@x.test\r\nSubject: pills\r\n\r\ncheap pills\r\n"
    uploaded = gw.client.post("/admin/learn/spam", content=spam, headers=AUTH)
    assert uploaded.json() == {"kind": "spam", "learned": "learned as spam"}
    assert gw.world.learned[-1] == (spam, "spam")
    assert gw.client.post("/admin/learn/spam", content=spam).status_code == 401
    assert gw.client.post("/admin/learn/junk", content=spam, headers=AUTH).status_code == 422
    assert gw.client.post("/admin/learn/ham", content=b"x", headers=AUTH).status_code == 422
    assert gw.client.post(f"/admin/quarantine/{ident}/learn?kind=x",
                          headers=AUTH).status_code == 422


# --- learning and releases in message tracking (issue 29) ----------------------------------

KEPT_SPAM = (b"From: Deals <deals@offers.test>\r\nSubject: pills\r\n"
             b"Message-ID: <kept1@offers.test>\r\n\r\ncheap pills\r\n")


def tracked(gateway: Gateway) -> TrackingStore:
    """The gateway's tracking store, in memory (the test gateway runs without one, so that
    no collector starts): what its own events go to."""
    store = TrackingStore(":memory:", retention=86400, max_events=10_000)
    gateway.client.app.state.gateway.tracking = store
    return store


def kept_spam(settings: Settings, message: bytes = KEPT_SPAM, **client: str) -> str:
    envelope = Envelope(client={"ADDR": "203.0.113.7", "IDENT": "4Q2AB7", **client})
    return Quarantine(settings.quarantine_dir).store("spamd", envelope, message, "spam",
                                                     "score 9.1")


def found(gateway: Gateway, **criteria: str) -> list[dict[str, Any]]:
    response = gateway.client.get("/admin/tracking", params=criteria, headers=AUTH)
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def test_teaching_is_an_event_saying_what_spamassassin_answered(tmp_path: Path) -> None:
    """QuarantineAdmin.teach, the gateway's one place that learns: every answer of spamd's,
    its failure too, is an event linked to the message (Message-ID, the quarantine record's
    envelope, client and queue id)."""
    world, events = World(), []

    async def track(event: tracking.Event) -> None:
        events.append(event)

    store = Quarantine(str(tmp_path))
    ident = store.store("spamd", Envelope(client={"ADDR": "203.0.113.7", "IDENT": "4Q2AB7"}),
                        KEPT_SPAM, "spam", "score 9.1")
    record = store.record(ident)
    admin = QuarantineAdmin(store, {}, "mx.secumail.test", 1.0, learn=world.learn,
                            track=track)
    by = f"the admin, quarantined {ident} (API)"
    assert asyncio.run(admin.teach(KEPT_SPAM, "spam", by, record)) == "learned as spam"
    assert asyncio.run(admin.teach(KEPT_SPAM, "spam", by, record)) == "known as spam already"
    world.spamd_down = True
    failed = asyncio.run(admin.teach(KEPT_SPAM, "spam", by, record))
    assert failed == "not learned: spamd at /run/spamd/spamd.sock: connection refused"
    assert [e.detail for e in events] == [
        f"spam, taught by {by}: learned as spam", f"spam, taught by {by}: known as spam already",
        f"spam, taught by {by}: {failed}"]
    for event in events:
        assert (event.service, event.outcome, event.client, event.sender, event.recipients,
                event.queue_id, event.message_id) == (
            "gateway", "learned", "203.0.113.7", "alice@remote.test", ("bob@secumail.test",),
            "4Q2AB7", "kept1@offers.test")
    events.clear()
    alone = QuarantineAdmin(store, {}, "mx.secumail.test", 1.0, track=track)
    assert asyncio.run(alone.teach(KEPT_SPAM, "ham", "the admin, uploading it (API)")) == \
        "not learned: no spamd to teach"
    assert [(e.detail, e.sender, e.message_id) for e in events] == [
        ("ham, taught by the admin, uploading it (API): not learned: no spamd to teach", "",
         "kept1@offers.test")]


def test_a_release_is_on_the_messages_path_and_without_learning_says_so(gw: Gateway
                                                                        ) -> None:
    store = tracked(gw)
    quiet, taught = kept_spam(gw.settings), kept_spam(
        gw.settings, KEPT_SPAM.replace(b"<kept1@", b"<kept2@"), IDENT="4Q2AB8")
    # What the spamd filter recorded when it kept the first, as the collector stored it.
    store.add("boot1", 1, [StoredEvent(tracking.event(
        "spamd", "quarantined", "spam: score 9.1", client="203.0.113.7",
        sender="alice@remote.test", recipients=["bob@secumail.test"], queue_id="4Q2AB7",
        message_id="kept1@offers.test", at=time.time() - 60), "spamd-1")])
    gw.world.release_reply = SmtpReply(250, ("2.0.0 Ok: queued as 4Q9XY7",))
    answer = gw.client.post(f"/admin/quarantine/{quiet}/release?learn=false", headers=AUTH)
    assert answer.json()["learned"] == "not learned: released without learning"
    assert gw.world.learned == [] and len(gw.world.released) == 1  # released, not learned
    [message] = found(gw, message_id="kept1@offers.test")
    assert message["outcome"] == "released"
    assert [(e["service"], e["outcome"], e["replica"]) for e in message["events"]] == [
        ("spamd", "quarantined", "spamd-1"), ("gateway", "released", "gateway-1")]
    released = message["events"][1]
    assert released["detail"] == (f"{quiet} by the admin (API) to postfix:10027: 250 2.0.0 "
                                  "Ok: queued as 4Q9XY7; released without learning")
    assert (released["sender"], released["recipients"], released["client"],
            released["queue_id"], released["next_queue_id"]) == (
        "alice@remote.test", ["bob@secumail.test"], "203.0.113.7", "4Q2AB7", "4Q9XY7")

    gw.world.release_reply = SmtpReply(250, ("2.0.0 Ok: queued as 4Q9XY8",))
    assert gw.client.post(f"/admin/quarantine/{taught}/release", headers=AUTH
                          ).json()["learned"] == "learned as ham"
    assert gw.world.learned == [(KEPT_SPAM.replace(b"<kept1@", b"<kept2@"), "ham")]
    [message] = found(gw, message_id="kept2@offers.test")
    assert [(e["outcome"], e["detail"]) for e in message["events"]] == [
        ("released", f"{taught} by the admin (API) to postfix:10027: 250 2.0.0 Ok: queued as "
                     "4Q9XY8"),
        ("learned", f"ham, taught by the admin, releasing {taught} (API): learned as ham")]
    assert message["outcome"] == "released"  # learning is a note, not where it went


def test_the_admins_learning_is_in_tracking_with_spamds_answer(gw: Gateway) -> None:
    tracked(gw)
    ident = kept_spam(gw.settings)
    gw.client.post(f"/admin/quarantine/{ident}/learn?kind=spam", headers=AUTH)
    gw.world.spamd_down = True
    gw.client.post(f"/admin/quarantine/{ident}/learn?kind=spam", headers=AUTH)
    [message] = found(gw, message_id="kept1@offers.test")
    assert [e["detail"] for e in message["events"]] == [
        f"spam, taught by the admin, quarantined {ident} (API): learned as spam",
        f"spam, taught by the admin, quarantined {ident} (API): not learned: spamd at "
        "/run/spamd/spamd.sock: connection refused"]
    assert message["outcome"] == "learned"  # the filter's own event is not collected here
    gw.world.spamd_down = False
    delivered = (b"Return-Path: <bounce@offers.test>\r\nDelivered-To: dave@secumail.test\r\n"
                 b"Subject: pills\r\nMessage-ID: <up1@offers.test>\r\n\r\npills\r\n")
    gw.client.post("/admin/learn/spam", content=delivered, headers=AUTH)
    [message] = found(gw, recipient="dave@secumail.test")
    [event] = message["events"]
    assert (event["outcome"], event["detail"], event["sender"], event["message_id"]) == (
        "learned", "spam, taught by the admin, uploading it (API): learned as spam",
        "bounce@offers.test", "up1@offers.test")


def test_a_tracking_store_that_fails_undoes_no_release(gw: Gateway) -> None:
    tracked(gw).close()  # every write now fails
    ident = kept_spam(gw.settings)
    response = gw.client.post(f"/admin/quarantine/{ident}/release", headers=AUTH)
    assert response.status_code == 200 and response.json()["learned"] == "learned as ham"
    assert len(gw.world.released) == 1


def test_a_refused_release_keeps_the_message(gw: Gateway) -> None:
    ident = quarantined(gw.settings)
    gw.world.release_reply = SmtpReply(554, ("5.7.1 Message refused as spam (score 12.0)",))
    response = gw.client.post(f"/admin/quarantine/{ident}/release", headers=AUTH)
    assert response.status_code == 502
    assert response.json() == {"detail": "the next hop refused the message", "step": "DATA",
                                "reply": "554 5.7.1 Message refused as spam (score 12.0)"}
    assert gw.client.get(f"/admin/quarantine/{ident}", headers=AUTH).status_code == 200


def test_delete_removes_both_files(gw: Gateway) -> None:
    ident = quarantined(gw.settings)
    assert gw.client.delete(f"/admin/quarantine/{ident}", headers=AUTH).status_code == 204
    assert list(Path(gw.settings.quarantine_dir).rglob(f"{ident}*")) == []
    assert gw.client.delete(f"/admin/quarantine/{ident}", headers=AUTH).status_code == 404


# --- DKIM ---------------------------------------------------------------------------------


def test_dkim_keys_are_generated_listed_and_activated(gw: Gateway) -> None:
    assert gw.client.get("/admin/dkim/keys", headers=AUTH).json() == []
    made = gw.client.post("/admin/dkim/keys", headers=AUTH,
                          json={"domain": "Secumail.Test", "selector": "s1", "bits": 1024})
    assert made.status_code == 201, made.text
    report = made.json()
    assert report["domain"] == "secumail.test" and report["selector"] == "s1"
    assert report["activated"] and report["record_name"] == "s1._domainkey.secumail.test"
    assert report["record_value"].startswith("v=DKIM1; k=rsa; p=")
    assert gw.client.post("/admin/dkim/keys", headers=AUTH,
                          json={"domain": "secumail.test", "selector": "s1"}).status_code == 409
    second = gw.client.post("/admin/dkim/keys", headers=AUTH,
                            json={"domain": "secumail.test", "selector": "s2", "bits": 1024})
    assert not second.json()["activated"]  # an RSA key signs already
    edwards = gw.client.post("/admin/dkim/keys", headers=AUTH,
                             json={"domain": "secumail.test", "key_type": "ed25519"}).json()
    assert edwards["activated"] and edwards["record_value"].startswith("v=DKIM1; k=ed25519;")
    listed = gw.client.get("/admin/dkim/keys", headers=AUTH).json()
    assert {(k["selector"], k["active"]) for k in listed} == {
        ("s1", True), ("s2", False), (edwards["selector"], True)}
    assert listed[0]["record_value"] == report["record_value"] or listed[1]["record_value"]
    activated = gw.client.post("/admin/dkim/keys/secumail.test/s2/activate", headers=AUTH)
    assert activated.json() == {"domain": "secumail.test",
                                "active": [edwards["selector"], "s2"]}
    missing = gw.client.post("/admin/dkim/keys/secumail.test/s9/activate", headers=AUTH)
    assert missing.status_code == 404


def test_dkim_keys_listing_says_what_rotation_made_of_each(make_gateway: Any) -> None:
    gateway = make_gateway(dkim_rotate_days=90, dkim_retired_days=7)
    keys_dir = Path(gateway.settings.dkim_keys_dir)
    for selector, age in (("s0", 200), ("s1", 100), ("s2", 1)):
        made = dkim_keys.keygen(keys_dir, "secumail.test", selector, "rsa", 1024,
                                activate_now=selector == "s1")
        then = time.time() - age * 86400
        os.utime(made.key_path, (then, then))
    listed = {k["selector"]: k for k in gateway.client.get("/admin/dkim/keys",
                                                          headers=AUTH).json()}
    assert {s: k["role"] for s, k in listed.items()} == {
        "s0": "retired", "s1": "signing", "s2": "awaiting-record"}
    activated = os.stat(keys_dir / "secumail.test" / "active").st_mtime
    assert listed["s0"]["removable_after"] == pytest.approx(activated + 7 * 86400)
    assert listed["s1"]["removable_after"] is None
    # What to publish, in /health too (issue 33: "the console and /health say what").
    health = gateway.client.get("/health", headers=AUTH).json()
    assert [(k["selector"], k["record_name"], k["record_value"])
            for k in health["dkim_awaiting_record"]] == [
        ("s2", listed["s2"]["record_name"], listed["s2"]["record_value"])]


@pytest.mark.parametrize("body", [{"domain": "localhost"}, {"domain": "a..b"},
                                  {"domain": "example.org", "selector": "bad selector"},
                                  {"domain": "example.org", "bits": 512},
                                  {"domain": "example.org", "key_type": "dsa"}])
def test_bad_keygen_requests_are_422(gw: Gateway, body: dict[str, Any]) -> None:
    assert gw.client.post("/admin/dkim/keys", headers=AUTH, json=body).status_code == 422
    assert not Path(gw.settings.dkim_keys_dir).exists() or not any(
        Path(gw.settings.dkim_keys_dir).rglob("*.private"))


def test_activate_with_a_bad_domain_is_422(gw: Gateway) -> None:
    response = gw.client.post("/admin/dkim/keys/not_a_domain/s1/activate", headers=AUTH)
    assert response.status_code == 422


# --- the OpenAPI document and the logs ----------------------------------------------------


def test_openapi_documents_every_route_with_its_errors(gw: Gateway) -> None:
    document = gw.client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["AdminToken"] == {"type": "http", "scheme": "bearer",
                                     "description": "SECUMAIL_ADMIN_TOKEN"}
    operations = [(path, method, op) for path, item in document["paths"].items()
                  for method, op in item.items()]
    assert len(operations) == 30
    for path, method, operation in operations:
        admin = path.startswith("/admin") or (path, method) == ("/probe", "post")
        assert ("401" in operation["responses"]) == admin, (path, method)
        assert (operation.get("security") == [{"AdminToken": []}]) == admin, (path, method)
        for code, response in operation["responses"].items():
            plain = ("/metrics", "/.well-known/mta-sts.txt")  # text by design
            if code not in ("204",) and path not in plain and not path.endswith("/message"):
                assert "application/json" in response["content"], (path, method, code)
        assert operation.get("summary"), (path, method)
    assert "404" in document["paths"]["/admin/quarantine/{ident}"]["delete"]["responses"]
    assert "502" in document["paths"]["/admin/quarantine/{ident}/release"]["post"]["responses"]
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]
    assert "400" in document["paths"]["/admin/tracking"]["get"]["responses"]
    assert "409" in document["paths"]["/admin/quarantine/digest"]["post"]["responses"]
    assert "409" in document["paths"]["/admin/dmarc/reports"]["post"]["responses"]
    assert "409" in document["paths"]["/admin/tls/reports"]["post"]["responses"]


def test_a_report_round_asked_while_reports_are_off_is_409(gw: Gateway) -> None:
    for path, setting in (("/admin/dmarc/reports", "SECUMAIL_DMARC_REPORTS"),
                          ("/admin/tls/reports", "SECUMAIL_TLSRPT")):
        response = gw.client.post(path, headers=AUTH)
        assert response.status_code == 409 and setting in response.text, response.text


def test_no_token_ever_reaches_a_log_line(make_gateway: Any, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = make_gateway(metrics_token=METRICS)
    client = gateway.client
    client.get(f"/metrics?token={METRICS}")
    client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})
    client.get("/admin/quarantine", headers={"Authorization": f"Bearer {ADMIN}x"})
    client.get(f"/admin/quarantine?access_token={ADMIN}")
    client.get("/admin/quarantine", headers=AUTH)
    client.post("/probe", headers=AUTH)
    # The test client's own request lines (logger httpx2, to testserver) are not the gateway's.
    lines = [json.dumps([r.getMessage(), getattr(r, "secumail_fields", {})], default=str)
             for r in caplog.records if "http://testserver/" not in r.getMessage()]
    assert any("unauthorized" in line for line in lines)  # the refusals are logged...
    assert not [line for line in lines if ADMIN in line or METRICS in line]  # ...not the tokens


# --- robustness ---------------------------------------------------------------------------


def test_metrics_answer_from_the_last_round_while_a_new_one_runs(gw: Gateway) -> None:
    ready = ("secumail_replica_ready", frozenset({("service", "clamd"),
                                                  ("instance", "10.0.2.1:3310"),
                                                  ("container", "replica-10.0.2.1")}))
    assert samples(gw.client.get("/metrics").text)[ready] == 1
    gw.world.failing["10.0.2.1:3310"] = "Connection refused"
    checker = gw.client.app.state.gateway.checker
    checker.checked_at -= 60  # the last round is old now
    # Still the last round's answer: /metrics does not wait for probes...
    assert samples(gw.client.get("/metrics").text)[ready] == 1
    # ...but it started a new round, which /health then waits for.
    [clamd] = [s for s in gw.client.get("/health").json()["services"]
               if s["service"] == "clamd"]
    assert clamd["status"] == "failing"


def test_a_probe_that_breaks_marks_its_replica_failing(make_gateway: Any) -> None:
    world = World()

    async def broken(instance: str, timeout: float) -> str:
        raise RuntimeError("a bug in a probe")

    gateway = make_gateway(world)
    checker = gateway.client.app.state.gateway.checker
    checker.hops = [replace(h, probe=broken) if h.service == "spamd" else h
                    for h in checker.hops]
    response = gateway.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failing"][0]["error"].endswith("RuntimeError: a bug in a probe")


def test_an_unreadable_quarantine_record_is_skipped(gw: Gateway) -> None:
    good = quarantined(gw.settings)
    broken = Path(gw.settings.quarantine_dir) / "clamav" / "20990101T000000-0123456789ab.json"
    broken.write_text(json.dumps({"id": "20990101T000000-0123456789ab"}))
    listed = gw.client.get("/admin/quarantine", headers=AUTH).json()
    assert [item["id"] for item in listed] == [good]


def test_requests_for_other_host_names_are_refused(gw: Gateway) -> None:
    """DNS rebinding: a page on another site reaching the gateway through the browser."""
    raw = gw.client.client  # the refusal comes before any route: no OpenAPI entry to check
    assert raw.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400
    assert raw.get("/metrics", headers={"Host": "attacker.example:80"}).status_code == 400
    assert raw.get("/healthz", headers={"Host": "10.0.0.1:8080"}).status_code == 200
    assert raw.get("/healthz", headers={"Host": "mx.secumail.test"}).status_code == 200



def test_bayes_state_in_health_and_metrics(make_gateway: Any, tmp_path: Path) -> None:
    """Issue 29: what Bayes has learned, as the spamassassin container wrote it beside its
    socket; nothing while it has written nothing."""
    sockets = tmp_path / "spamd"
    sockets.mkdir()
    gateway = make_gateway(spamassassin_address=str(sockets / "spamd.sock"))
    assert gateway.client.get("/health").json()["bayes"] is None
    (sockets / "bayes").write_text('{"spam": 512, "ham": 2503, "tokens": 140000, '
                                   '"newest": 1796600000, "checked": 1796600100}\n')
    assert gateway.client.get("/health").json()["bayes"] == {
        "spam": 512, "ham": 2503, "tokens": 140000, "newest": 1796600000.0,
        "checked": 1796600100.0}
    lines = [line for line in gateway.client.get("/metrics").text.splitlines()
             if line.startswith("secumail_bayes_learned{")]
    assert any('kind="spam"' in line and line.endswith(" 512.0") for line in lines), lines
    assert any('kind="ham"' in line and line.endswith(" 2503.0") for line in lines), lines
    (sockets / "bayes").write_text("{half written")
    assert gateway.client.get("/health").json()["bayes"] is None


def test_spamassassin_rules_state_in_health_and_metrics(make_gateway: Any,
                                                        tmp_path: Path) -> None:
    """Issue 29: which rules spamd loads and why sa-update could not keep them current, as
    services/spamd/rules-update.sh wrote it beside the socket; an alert can use the gauge."""
    sockets = tmp_path / "spamd"
    sockets.mkdir()
    gateway = make_gateway(spamassassin_address=str(sockets / "spamd.sock"))
    assert gateway.client.get("/health").json()["spamassassin_rules"] is None
    offline = ("sa-update could not update the rules from SpamAssassin's mirrors (exit 4: no "
               "'mirrors.updates.spamassassin.org' record found)")
    (sockets / "rules").write_text(json.dumps({"version": "4.0.1", "rules": "image",
                                               "checked": 1796600100, "error": offline}))
    assert gateway.client.get("/health").json()["spamassassin_rules"] == {
        "version": "4.0.1", "rules": "image", "checked": 1796600100.0, "error": offline}
    def failing() -> list[str]:
        return [line.rsplit(" ", 1)[1] for line in gateway.client.get("/metrics").text
                .splitlines() if line.startswith("secumail_spamassassin_rules_update_failing")]

    assert failing() == ["1.0"]
    (sockets / "rules").write_text(json.dumps({"version": "4.0.1", "rules": "rules-0123",
                                               "checked": 1796600200, "error": ""}))
    assert failing() == ["0.0"]
