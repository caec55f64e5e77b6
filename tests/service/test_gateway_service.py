"""The gateway as a real process over a real chain on loopback: Postfix under its
supervisor, the policy service, the DKIM milter, both content filters, clamd and spamd, and
a real Prometheus server scraping the gateway.

Each service listens on a loopback address of its own (127.0.0.2, .3, ...) with its
metrics on the same port everywhere, as containers do on theirs: the gateway finds each
replica's metrics listener at the replica's address and SECUMAIL_METRICS_LISTEN's port.
"""

from __future__ import annotations

import email
import json
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from secumail import probes
from secumail.quarantine import Quarantine
from testkit import mail
from testkit.dkim import dkim_env
from testkit.dnsserver import LoopbackDNS
from testkit.policy_client import PolicyClient, rcpt_request
from testkit.postfix import PostfixInstance
from testkit.processes import (
    VENV_BIN,
    Daemon,
    free_port,
    require_binary,
    service_env,
    wait_for_port,
)
from testkit.scanners import Clamd, Spamd
from testkit.sink import SmtpSink
from tests.service.test_gateway_postfix import DRIVER

ADMIN = "admin-token-for-the-service-tests"
METRICS = "metrics-token-for-the-service-tests"
HOSTS = {"postfix": "127.0.0.1", "policy": "127.0.0.2", "clamav": "127.0.0.3",
         "spamd": "127.0.0.4", "dkim": "127.0.0.5"}


def free_port_everywhere() -> int:
    """A port free on every loopback address the services use."""
    while True:
        port = free_port()
        try:
            for host in HOSTS.values():
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port


def start(script: str, env: dict[str, str], listen_variable: str) -> Daemon:
    """start_service, for a listener on any loopback address."""
    daemon = Daemon([str(VENV_BIN / script)], env, name=script)
    host, port = env[listen_variable].rsplit(":", 1)
    try:
        wait_for_port(int(port), host=host)
    except TimeoutError:
        daemon.stop()
        raise AssertionError(f"{script} did not start:\n" + daemon.output()) from None
    return daemon


@dataclass
class Stack:
    gateway: Daemon
    gateway_port: int
    metrics_port: int
    clamd: Clamd
    sink: SmtpSink
    quarantine: Path
    keys: Path
    ports: dict[str, int]

    def request(self, method: str, path: str, token: str | None = ADMIN,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.gateway_port}{path}",
                                         data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw, status, kind = response.read(), response.status, response.headers
        except urllib.error.HTTPError as error:
            raw, status, kind = error.read(), error.code, error.headers
        if "json" in kind.get("Content-Type", ""):
            return status, json.loads(raw)
        return status, raw.decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.request("GET", "/metrics", token=METRICS)
        assert status == 200, text
        # Without `container`: a replica's name comes from reverse DNS, which loopback
        # addresses do not give here (the unit and e2e tests check that label).
        return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "container")):
                s.value for family in text_string_to_metric_families(text)
                for s in family.samples}

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}\n{self.gateway.output()[-3000:]}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(spamd: Spamd) -> Iterator[Stack]:
    metrics_port = free_port_everywhere()
    ports = {name: free_port() for name in ("policy", "clamav", "spamd", "dkim", "gateway")}
    work = Path(tempfile.mkdtemp(prefix="secumail-gateway-"))
    quarantine, keys, greylist = work / "quarantine", work / "dkim", work / "greylist.sqlite"
    daemons: list[Daemon] = []
    sink = SmtpSink().start()
    dns = LoopbackDNS().start()
    clamd = Clamd().start()
    postfix = PostfixInstance({"maillog_file": "/dev/stdout",
                               "maillog_file_prefixes": "/dev/stdout"})
    (postfix.root / "queue").mkdir()
    postfix.postfix("set-permissions", "create-missing")

    def metrics(name: str) -> str:
        return f"{HOSTS[name]}:{metrics_port}"

    try:
        daemons.append(Daemon(
            [sys.executable, "-c", DRIVER, str(work), str(postfix.root / "queue"),
             str(postfix.config_dir)],
            service_env(metrics_listen=metrics("postfix")), name="postfix-supervisor"))
        wait_for_port(postfix.port, timeout=20)
        ports["postfix"] = postfix.port
        daemons.append(start("secumail-policy", service_env(
            policy_listen=f"{HOSTS['policy']}:{ports['policy']}", metrics_listen=metrics("policy"),
            greylist_store=f"sqlite://{greylist}", spf_enabled="false", greylist_delay="60",
            greylist_mode="all",
        ), "SECUMAIL_POLICY_LISTEN"))
        common = {"clamd_address": clamd.address, "spamassassin_address": spamd.address,
                  "quarantine_dir": str(quarantine), "relay_timeout": "30",
                  "virus_action": "quarantine"}
        daemons.append(start("secumail-spamd", service_env(
            spamd_listen=f"{HOSTS['spamd']}:{ports['spamd']}", metrics_listen=metrics("spamd"),
            spamd_next_hop=f"127.0.0.1:{sink.port}", **common), "SECUMAIL_SPAMD_LISTEN"))
        daemons.append(start("secumail-clamav", service_env(
            clamav_listen=f"{HOSTS['clamav']}:{ports['clamav']}",
            metrics_listen=metrics("clamav"),
            clamav_next_hop=f"{HOSTS['spamd']}:{ports['spamd']}", **common),
            "SECUMAIL_CLAMAV_LISTEN"))
        dkim = dkim_env(ports["dkim"], keys, dns.spec)
        dkim.update({"SECUMAIL_DKIM_LISTEN": f"{HOSTS['dkim']}:{ports['dkim']}",
                     "SECUMAIL_METRICS_LISTEN": metrics("dkim")})
        daemons.append(start("secumail-dkim", dkim, "SECUMAIL_DKIM_LISTEN"))
        gateway_env = service_env(
            gateway_listen=f"127.0.0.1:{ports['gateway']}",
            metrics_listen=f"127.0.0.1:{metrics_port}",  # the port the replicas' listeners use
            admin_token=ADMIN, metrics_token=METRICS,
            postfix_address=f"127.0.0.1:{postfix.port}",
            policy_address=f"{HOSTS['policy']}:{ports['policy']}",
            dkim_milter_address=f"{HOSTS['dkim']}:{ports['dkim']}",
            content_filter_address=f"{HOSTS['clamav']}:{ports['clamav']}",
            clamav_next_hop=f"{HOSTS['spamd']}:{ports['spamd']}",
            clamd_address=clamd.address, spamassassin_address=spamd.address,
            quarantine_dir=str(quarantine), dkim_keys_dir=str(keys),
            spamd_next_hop=f"127.0.0.1:{sink.port}",  # where the spamd filter's mail goes
            greylist_store=f"sqlite://{greylist}", probe_interval="0", gateway_timeout="3",
            tracking_db=str(greylist.parent / "tracking.db"), tracking_interval="0.5",
        )
        gateway = start("secumail-gateway", gateway_env, "SECUMAIL_GATEWAY_LISTEN")
        daemons.append(gateway)
        yield Stack(gateway, ports["gateway"], metrics_port, clamd, sink, quarantine, keys,
                    ports)
    finally:
        for daemon in reversed(daemons):
            daemon.stop(timeout=20)
        postfix.postfix("stop")
        postfix.stop()
        clamd.stop()
        dns.stop()
        sink.stop()


def test_every_hop_is_ready_with_its_replica(stack: Stack) -> None:
    status, body = stack.request("GET", "/readyz", token=METRICS)
    assert (status, body) == (200, {"status": "ready", "failing": []})
    status, health = stack.request("GET", "/health", token=METRICS)
    services = {s["service"]: s for s in health["services"]}
    assert list(services) == ["postfix", "policy", "dkim", "clamav", "spamd", "clamd",
                              "spamassassin"]
    assert all(len(s["replicas"]) == 1 and s["status"] == "ok" for s in services.values())
    assert services["postfix"]["replicas"][0]["answer"].startswith("220 mx.secumail.test")
    assert services["dkim"]["replicas"][0]["answer"].startswith("milter v6")
    assert services["clamd"]["replicas"][0]["answer"] == "PONG"


def test_readyz_follows_clamd_down_and_back(stack: Stack) -> None:
    stack.clamd.stop()
    try:
        stack.wait_for(lambda: stack.request("GET", "/readyz", token=METRICS)[0] == 503,
                       "readyz stayed 200 with clamd stopped")
        _, body = stack.request("GET", "/readyz", token=METRICS)
        assert [f["service"] for f in body["failing"]] == ["clamd"]
        assert "Connection refused" in body["failing"][0]["error"]
    finally:
        stack.clamd.start()  # same port, same signatures
    stack.wait_for(lambda: stack.request("GET", "/readyz", token=METRICS)[0] == 200,
                   "readyz did not come back with clamd")
    _, health = stack.request("GET", "/health", token=METRICS)
    [clamd] = [s for s in health["services"] if s["service"] == "clamd"]
    assert "Connection refused" in clamd["replicas"][0]["last_error"]  # kept after recovery


def send_through_filters(stack: Stack, message: bytes) -> None:
    with smtplib.SMTP(HOSTS["clamav"], stack.ports["clamav"], timeout=60) as smtp:
        smtp.sendmail("alice@remote.test", ["bob@secumail.test"], message)


def test_metrics_show_every_service_and_counters_that_move(stack: Stack) -> None:
    found = stack.metrics()
    port = stack.metrics_port
    for service in ("postfix", "policy", "clamav", "spamd", "dkim"):
        key = ("secumail_up", frozenset({("service", service),
                                         ("instance", f"{HOSTS[service]}:{port}")}))
        assert found.get(key) == 1, (service, stack.gateway.output()[-2000:])
    assert ("secumail_postfix_queue_messages", frozenset({
        ("queue", "deferred"), ("service", "postfix"),
        ("instance", f"127.0.0.1:{port}")})) in found
    clean = ("secumail_filter_messages_total", frozenset({
        ("filter", "clamav"), ("verdict", "clean"), ("service", "clamav"),
        ("instance", f"{HOSTS['clamav']}:{port}")}))
    before = found.get(clean, 0)
    send_through_filters(stack, mail.plain(subject="counted"))
    assert stack.metrics()[clean] == before + 1


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[int]:
    binary = require_binary("prometheus")
    work = Path(tempfile.mkdtemp(prefix="secumail-prometheus-"))
    (work / "token").write_text(METRICS)
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: secumail\n"
        "    honor_labels: true\n"
        f"    authorization: {{credentials_file: {work / 'token'}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{stack.gateway_port}']}}]\n"
    )
    port = free_port()
    daemon = Daemon([binary, f"--config.file={work / 'prometheus.yml'}",
                     f"--storage.tsdb.path={work / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}"], name="prometheus")
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        daemon.stop()
        raise AssertionError(daemon.output()) from None
    yield port
    daemon.stop()


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_a_real_prometheus_scrapes_the_stack_through_the_gateway(
    stack: Stack, prometheus: int
) -> None:
    send_through_filters(stack, mail.plain(subject="for prometheus"))
    promql = 'secumail_filter_messages_total{service="clamav",verdict="clean"}'
    deadline = time.monotonic() + 60
    while not (result := query(prometheus, promql)):
        assert time.monotonic() < deadline, query(prometheus, "up")
        time.sleep(0.5)
    [series] = result
    # honor_labels: the gateway's service and instance labels, not Prometheus's own.
    assert series["metric"]["instance"] == f"{HOSTS['clamav']}:{stack.metrics_port}"
    assert series["metric"]["job"] == "secumail"
    assert float(series["value"][1]) >= 1
    [up] = query(prometheus, 'up{job="secumail"}')
    assert up["value"][1] == "1"  # the bearer token from credentials_file was accepted


def test_tokens_never_reach_the_gateways_log(stack: Stack) -> None:
    stack.request("GET", f"/metrics?token={METRICS}", token=None)
    stack.request("GET", "/admin/quarantine", token=ADMIN + "x")
    stack.request("GET", f"/admin/quarantine?access_token={ADMIN}", token=None)
    assert stack.request("GET", "/admin/quarantine")[0] == 200
    time.sleep(0.5)  # the log is flushed every 0.2 s
    output = stack.gateway.output()
    assert "unauthorized" in output
    assert ADMIN not in output and METRICS not in output


def test_whitelisting_a_client_reaches_the_running_policy_service(stack: Stack) -> None:
    client = PolicyClient(stack.ports["policy"], host=HOSTS["policy"])
    request = rcpt_request(client_address="192.0.2.10", sender="a@remote.test",
                           recipient="bob@secumail.test", instance="gw.1")
    assert client.ask(request).startswith("DEFER_IF_PERMIT")
    time.sleep(0.3)  # the policy service commits its writes every 0.1 s
    _, entries = stack.request("GET", "/admin/greylist/entries?match=192.0.2.0/24")
    assert [e["sender"] for e in entries] == ["a@remote.test"]
    status, item = stack.request("POST", "/admin/greylist/whitelist",
                                 body={"kind": "client", "value": "192.0.2.0/24"})
    assert status == 201, item
    other = rcpt_request(client_address="192.0.2.11", sender="z@remote.test",
                         recipient="bob@secumail.test", instance="gw.2")
    deadline = time.monotonic() + 15
    while (answer := client.ask(other)) != "DUNNO":
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    key = urllib.parse.quote(entries[0]["key"], safe="/@")
    assert stack.request("DELETE", f"/admin/greylist/entries/{key}")[0] == 204
    assert stack.request("DELETE", "/admin/greylist/whitelist/client/192.0.2.0/24")[0] == 204


def test_quarantined_virus_is_released_past_clamav_only(stack: Stack) -> None:
    send_through_filters(stack, mail.eicar())
    _, items = stack.request("GET", "/admin/quarantine?filter=clamav")
    assert items, "the clamav filter quarantined nothing"
    ident = items[0]["id"]
    before = len(stack.sink.envelopes)
    status, report = stack.request("POST", f"/admin/quarantine/{ident}/release")
    assert status == 200, report
    assert report["next_hop"] == f"{HOSTS['spamd']}:{stack.ports['spamd']}"
    assert len(stack.sink.envelopes) == before + 1
    delivered = stack.sink.handler.messages[-1]
    assert delivered[0].rcpt_tos == ["bob@secumail.test"]
    text = delivered[1].decode(errors="replace")
    assert f"X-SecuMail-Released: {ident}" in text
    assert "X-Spam-Status:" in text  # the next filter still ran
    assert stack.request("GET", f"/admin/quarantine/{ident}")[0] == 404


def test_keys_generated_through_the_api_are_the_dkim_tools_keys(stack: Stack) -> None:
    status, made = stack.request("POST", "/admin/dkim/keys", body={
        "domain": "secumail.test", "selector": "gw1", "key_type": "ed25519"})
    assert status == 201, made
    listed = subprocess.run(
        [str(VENV_BIN / "secumail-dkim"), "--keys-dir", str(stack.keys), "keys"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert f"secumail.test\tgw1\ted25519\tactive\t{made['record_value']}" in listed


async def test_probes_of_the_real_daemons(stack: Stack) -> None:
    milter_probe, _ = probes.PROBES["milter"]
    banner_probe, _ = probes.PROBES["banner"]
    assert (await milter_probe(f"{HOSTS['dkim']}:{stack.ports['dkim']}", 5)).startswith(
        "milter v6")
    with pytest.raises(probes.PROBE_ERRORS):  # a policy service is no milter
        await milter_probe(f"{HOSTS['policy']}:{stack.ports['policy']}", 3)
    with pytest.raises(probes.PROBE_ERRORS):  # a milter says nothing first: no banner
        await banner_probe(f"{HOSTS['dkim']}:{stack.ports['dkim']}", 1)
    assert await probes.replicas(f"localhost:{stack.ports['dkim']}") in (
        [f"127.0.0.1:{stack.ports['dkim']}"],
        [f"127.0.0.1:{stack.ports['dkim']}", f"[::1]:{stack.ports['dkim']}"],
    )


async def test_the_http_probe_the_gateway_image_uses(stack: Stack) -> None:
    assert (await probes.http_health(f"127.0.0.1:{stack.gateway_port}")).endswith("200 OK")
    with pytest.raises(ConnectionError, match="404"):  # the Postfix agent has no /healthz
        await probes.http_health(f"127.0.0.1:{stack.metrics_port}")


def test_the_shipped_prometheus_config_is_valid_and_keeps_the_gateways_labels() -> None:
    checked = subprocess.run(
        [require_binary("promtool"), "check", "config", "--syntax-only", "prometheus.yml"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = (Path(__file__).resolve().parents[2] / "prometheus.yml").read_text()
    assert "honor_labels: true" in text and '"gateway:8080"' in text


def test_a_null_sender_message_is_released_with_a_null_sender(stack: Stack) -> None:
    """aiosmtpd records the null sender as "<>"; the release must say MAIL FROM:<>."""
    envelope = types.SimpleNamespace(mail_from="<>", rcpt_tos=("bob@secumail.test",),
                                     client={"ADDR": "203.0.113.9"})
    ident = Quarantine(str(stack.quarantine)).store(
        "spamd", envelope, mail.plain(subject="a bounce"), "spam", "score 11.0")
    status, report = stack.request("POST", f"/admin/quarantine/{ident}/release")
    assert status == 200, report
    envelope_seen, _ = stack.sink.handler.messages[-1]
    assert envelope_seen.mail_from in ("", "<>")  # aiosmtpd's spelling of MAIL FROM:<>


def tracked(stack: Stack, query: str, expected: int = 1, timeout: float = 30
            ) -> list[dict[str, Any]]:
    """The tracking search's messages once `expected` are there (the gateway collects every
    0.5 s here)."""
    deadline = time.monotonic() + timeout
    while True:
        status, answer = stack.request("GET", f"/admin/tracking?{query}")
        assert status == 200, answer
        if len(answer["messages"]) >= expected or time.monotonic() > deadline:
            return list(answer["messages"])
        time.sleep(0.5)


def test_tracking_finds_what_each_service_decided(stack: Stack) -> None:
    """A greylisted request (policy), a virus kept and a clean message passed (both
    filters), a relay attempt (Postfix's log, through its agent): each found by one search,
    its path collected from the replicas' /events by the running gateway."""
    marker = uuid.uuid4().hex[:10]
    client = PolicyClient(stack.ports["policy"], host=HOSTS["policy"])
    grey = f"grey.{marker}@remote.test"  # from a network no other test whitelists
    assert client.ask(rcpt_request(client_address="198.18.0.30", sender=grey,
                                   recipient="bob@secumail.test", instance="tr.1")
                      ).startswith("DEFER_IF_PERMIT")
    clean = mail.plain(subject=f"clean {marker}")
    with smtplib.SMTP(HOSTS["clamav"], stack.ports["clamav"], timeout=60) as smtp:
        smtp.sendmail(f"clean.{marker}@remote.test", ["bob@secumail.test"], clean)
        smtp.sendmail(f"virus.{marker}@remote.test", ["bob@secumail.test"], mail.eicar())
    with smtplib.SMTP("127.0.0.1", stack.ports["postfix"], timeout=30) as smtp:
        smtp.ehlo("test-client.secumail.test")
        assert smtp.docmd("XCLIENT", "ADDR=203.0.113.50 NAME=[UNAVAILABLE]")[0] == 220
        smtp.ehlo("mail.remote.test")
        assert smtp.mail(f"relay.{marker}@remote.test")[0] == 250
        assert smtp.rcpt("carol@elsewhere.test")[0] in (454, 554)

    [greylisted] = tracked(stack, f"sender={grey}")
    assert greylisted["outcome"] == "greylisted" and greylisted["client"] == "198.18.0.30"
    assert [e["service"] for e in greylisted["events"]] == ["policy"]

    [passed] = tracked(stack, f"sender=clean.{marker}@remote.test", expected=1)
    paths = [(e["service"], e["outcome"]) for e in passed["events"]]
    assert paths == [("clamav", "passed"), ("spamd", "passed")], passed
    message_id = str(email.message_from_bytes(clean)["Message-ID"]).strip("<>")
    assert passed["message_id"] == message_id
    assert tracked(stack, f"message_id={urllib.parse.quote(message_id)}")[0]["events"] == \
        passed["events"]

    [virus] = tracked(stack, f"sender=virus.{marker}@remote.test")
    assert virus["outcome"] == "quarantined", virus
    assert "virus" in virus["events"][0]["detail"]

    [relay] = tracked(stack, f"sender=relay.{marker}@remote.test")
    assert [(e["service"], e["client"]) for e in relay["events"]] == [
        ("postfix", "203.0.113.50")]
    assert "Relay access denied" in relay["events"][0]["detail"]
    assert relay["recipients"] == ["carol@elsewhere.test"]
    assert stack.request("GET", "/admin/tracking")[0] == 400  # no criterion
    assert stack.request("GET", f"/admin/tracking?sender={grey}", token=None)[0] == 401
