"""The gateway in the compose stack (three clamav replicas), seen from the host through its
published port: readiness following clamd down and back, counters that move with mail, the
replicas in /health and /metrics, a canary through the whole chain, releases from
quarantine, and the `prometheus` profile's Prometheus scraping it all."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import mail
from tests.e2e.conftest import CLAMAV_REPLICAS, Stack
from tests.e2e.test_stack import BOT_HELO, attempt

ADMIN = "e2e-admin-token-0123456789"  # tests/e2e/compose.test.yaml
METRICS = "e2e-metrics-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Gateway:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.base = "http://" + os.environ["SECUMAIL_GATEWAY_PUBLISH"]

    def request(self, method: str, path: str, token: str | None = ADMIN,
                body: dict[str, Any] | None = None, timeout: float = 150) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw, status, headers = response.read(), response.status, response.headers
        except urllib.error.HTTPError as error:
            raw, status, headers = error.read(), error.code, error.headers
        if "json" in headers.get("Content-Type", ""):
            return status, json.loads(raw)
        return status, raw.decode()

    def ready(self) -> tuple[int, Any]:
        return self.request("GET", "/readyz", token=METRICS)

    def metrics(self) -> Samples:
        status, text = self.request("GET", "/metrics", token=METRICS)
        assert status == 200, text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}\n{self.stack.logs('gateway')[-4000:]}")
            time.sleep(1)


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def instances(samples: Samples, name: str, service: str) -> dict[str, float]:
    return {dict(labels)["instance"]: v for (n, labels), v in samples.items()
            if n == name and ("service", service) in labels}


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    gateway = Gateway(stack)

    def answers() -> bool:
        try:
            return gateway.ready()[0] == 200
        except OSError:
            return False

    gateway.wait_for(answers, "the gateway never said every hop is ready", timeout=240)
    return gateway


def compose(stack: Stack, *args: str) -> None:
    result = subprocess.run([*stack.compose, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_health_sees_every_hop_and_the_three_clamav_replicas(gateway: Gateway) -> None:
    status, health = gateway.request("GET", "/health", token=METRICS)
    assert status == 200 and health["status"] == "ok", health
    services = {s["service"]: s for s in health["services"]}
    assert {"postfix", "policy", "clamav", "spamd", "clamd", "spamassassin"} <= set(services)
    clamav = services["clamav"]["replicas"]
    assert len(clamav) == CLAMAV_REPLICAS and all(r["status"] == "ok" for r in clamav)
    # Docker's DNS names each replica's container (secumail-e2e_clamav_2, ...).
    assert len({r["name"] for r in clamav}) == CLAMAV_REPLICAS
    assert all("clamav" in (r["name"] or "") for r in clamav), clamav


def test_metrics_show_three_clamav_instances_and_counters_that_move(
    gateway: Gateway, stack: Stack
) -> None:
    before = gateway.metrics()
    up = instances(before, "secumail_up", "clamav")
    assert len(up) == CLAMAV_REPLICAS and set(up.values()) == {1.0}, up
    for service in ("postfix", "policy", "spamd"):
        assert set(instances(before, "secumail_up", service).values()) == {1.0}, service
    subject = "counted " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="alice@secumail.test", to="dave@secumail.test")
    code, reply = attempt(stack, "127.0.0.21", "alice@secumail.test", "dave@secumail.test",
                          message)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not [m for m in stack.mailbox("dave") if m["Subject"] == subject]:
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    after = gateway.metrics()
    moved = [
        ("secumail_filter_messages_total", {"service": "clamav", "verdict": "clean"}),
        ("secumail_filter_messages_total", {"service": "spamd"}),
        ("secumail_postfix_messages_received_total", {"source": "smtp"}),
        ("secumail_postfix_messages_received_total", {"source": "filters"}),
        ("secumail_postfix_deliveries_total", {"via": "virtual", "status": "sent"}),
    ]
    if stack.mode == "after-queue":  # before-queue, Postfix hands the filters nothing queued
        moved.append(("secumail_postfix_deliveries_total", {"via": "filter", "status": "sent"}))
    for name, labels in moved:
        assert total(after, name, **labels) >= total(before, name, **labels) + 1, (name, labels)
    queues = instances(after, "secumail_postfix_queue_messages", "postfix")
    assert queues, "no Postfix queue sizes"


def test_a_canary_crosses_the_whole_chain(gateway: Gateway, stack: Stack) -> None:
    assert gateway.request("POST", "/probe", token=None)[0] == 401
    status, report = gateway.request("POST", "/probe")
    assert status == 200, (report["error"], stack.logs("postfix")[-3000:])
    assert report["ok"] and report["missing"] == []
    assert {"policy", "clamav", "spamd"} <= set(report["headers"])
    assert report["end_to_end_seconds"] > 0 and report["queued"].startswith("250 ")
    assert gateway.request("GET", "/probe", token=METRICS)[1]["token"] == report["token"]
    left = [m for m in stack.mailbox("probe") if m["X-SecuMail-Probe"] == report["token"]]
    assert left == []  # taken out of the probe mailbox once seen
    found = gateway.metrics()
    assert total(found, "secumail_chain_probe_success") == 1


def test_null_sender_mail_crosses_the_filters(stack: Stack) -> None:
    subject = "null sender " + uuid.uuid4().hex[:8]
    message = mail.plain(subject=subject, sender="mailer-daemon@remote.test")
    code, reply = attempt(stack, "127.0.0.23", "", "bob@secumail.test", message)
    assert code == 250, reply  # Postfix takes it; the chain behind it must deliver it
    deadline = time.monotonic() + 30
    while not [m for m in stack.mailbox("bob") if m["Subject"] == subject]:
        assert time.monotonic() < deadline, "a null-sender message was not delivered"
        time.sleep(1)


def test_readyz_goes_503_without_clamd_and_back_to_200(gateway: Gateway, stack: Stack) -> None:
    compose(stack, "stop", "clamd")
    try:
        gateway.wait_for(lambda: gateway.ready()[0] == 503, "readyz stayed 200 without clamd")
        _, body = gateway.ready()
        assert [f["service"] for f in body["failing"]] == ["clamd"], body
    finally:
        compose(stack, "start", "clamd")
    gateway.wait_for(lambda: gateway.ready()[0] == 200, "readyz did not come back with clamd")
    stack.wait_healthy(["clamd"])


@pytest.mark.parametrize("path", ["/admin/quarantine", "/admin/greylist/whitelist",
                                  "/admin/dkim/keys"])
def test_admin_routes_need_the_token_in_the_header(gateway: Gateway, path: str) -> None:
    assert gateway.request("GET", path, token=None)[0] == 401
    assert gateway.request("GET", f"{path}?token={ADMIN}", token=None)[0] == 401
    assert gateway.request("GET", path, token=METRICS)[0] == 401
    assert gateway.request("GET", path)[0] == 200
    assert gateway.request("GET", "/metrics", token=None)[0] == 401


QUARANTINE_SCRIPT = """
import sys, types
from secumail.quarantine import Quarantine
envelope = types.SimpleNamespace(mail_from="alice@remote.test", rcpt_tos=("bob@secumail.test",),
    client={"ADDR": "203.0.113.7", "NAME": "mail.remote.test", "HELO": "mail.remote.test"})
message = ("Subject: %s\\r\\nFrom: alice@remote.test\\r\\nTo: bob@secumail.test\\r\\n\\r\\n"
           "kept by clamav, released by the gateway\\r\\n" % sys.argv[1]).encode()
print(Quarantine("/var/lib/secumail/quarantine").store("clamav", envelope, message, "virus",
                                                       "virus Test-Signature"))
"""


def test_release_delivers_past_clamav_through_spamd(gateway: Gateway, stack: Stack) -> None:
    subject = "released " + uuid.uuid4().hex[:8]
    made = stack.exec("clamav", "/opt/secumail/bin/python", "-c", QUARANTINE_SCRIPT, subject)
    assert made.returncode == 0, made.stderr
    ident = made.stdout.strip()
    status, listed = gateway.request("GET", "/admin/quarantine?filter=clamav")
    assert ident in [item["id"] for item in listed], listed
    status, report = gateway.request("POST", f"/admin/quarantine/{ident}/release")
    assert status == 200, report
    assert report["next_hop"] == "spamd:10026" and report["reply"].startswith("250")
    deadline = time.monotonic() + 60
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    [delivered] = found
    assert delivered["X-SecuMail-Released"].startswith(ident)
    assert delivered["X-Spam-Status"]  # the SpamAssassin filter still ran
    assert delivered["X-AV-Checked"] is None  # the filter that kept it was skipped
    assert gateway.request("GET", f"/admin/quarantine/{ident}")[0] == 404


def test_a_users_digest_arrives_signed_and_its_link_releases_to_them_alone(
        gateway: Gateway, stack: Stack) -> None:
    """Issue 32: users hear of their own quarantined mail, and release it without the admin."""
    stack.exec("dkim", "secumail-dkim", "keygen", "secumail.test", "--selector", "e2e")
    time.sleep(2)  # made by test_dkim.py already, or now: the milter sees it within 1 s
    subject = "digest " + uuid.uuid4().hex[:8]
    kept_as_spam = QUARANTINE_SCRIPT.replace(  # only spam is the users' to release
        '("bob@secumail.test",)', '("bob@secumail.test", "dave@secumail.test")').replace(
        '("clamav", envelope, message, "virus",', '("spamd", envelope, message, "spam",')
    made = stack.exec("spamd", "/opt/secumail/bin/python", "-c", kept_as_spam, subject)
    assert made.returncode == 0, made.stderr
    ident = made.stdout.strip()
    status, report = gateway.request("POST", "/admin/quarantine/digest")
    assert status == 200 and {"bob@secumail.test", "dave@secumail.test"} <= set(report["sent"])
    deadline = time.monotonic() + 60
    while not (digests := [m for m in stack.mailbox("bob") if subject in m.as_string()
                           and "kept in quarantine for you" in m["Subject"]]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    digest = digests[-1]
    assert "d=secumail.test" in " ".join(digest["DKIM-Signature"].split())  # signed as ours
    body = digest.get_payload(decode=True).decode()
    block = body[body.index(f"Subject: {subject}"):]  # the digest may list other mail too
    release = next(line.split()[-1] for line in block.splitlines()
                   if line.startswith("Release:"))
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(release).query)["t"][0]
    form = urllib.parse.urlencode({"t": token}).encode()
    with urllib.request.urlopen(urllib.request.Request(  # no admin token: the link is enough
            gateway.base + "/quarantine/link", data=form, method="POST"), timeout=60) as answer:
        assert answer.status == 200 and "Released" in answer.read().decode()
    while not (found := [m for m in stack.mailbox("bob") if m["Subject"] == subject]):
        assert time.monotonic() < deadline, stack.logs("postfix")[-3000:]
        time.sleep(1)
    assert found[0]["X-SecuMail-Released"].startswith(ident)
    status, kept = gateway.request("GET", f"/admin/quarantine/{ident}")
    assert status == 200 and kept["rcpt_tos"] == ["dave@secumail.test"]  # still dave's
    with pytest.raises(urllib.error.HTTPError) as again:
        urllib.request.urlopen(urllib.request.Request(
            gateway.base + "/quarantine/link", data=form, method="POST"), timeout=60)
    again.value.close()  # its socket
    assert again.value.code == 410
    assert gateway.request("DELETE", f"/admin/quarantine/{ident}")[0] == 204


def test_a_client_whitelisted_through_the_api_is_not_greylisted(
    gateway: Gateway, stack: Stack
) -> None:
    sender = f"wl.{uuid.uuid4().hex[:8]}@remote.test"
    status, _ = gateway.request("POST", "/admin/greylist/whitelist",
                                body={"kind": "client", "value": "203.0.113.7"})
    assert status in (200, 201)
    try:
        deadline = time.monotonic() + 20  # the policy service reads it back within 5 s
        # A client greylisting would delay (BOT_HELO) until the whitelisting applies.
        while (result := attempt(stack, "203.0.113.7", sender, "bob@secumail.test",
                                 helo=BOT_HELO))[0] == 450:
            assert time.monotonic() < deadline, result
            time.sleep(1)
            sender = f"wl.{uuid.uuid4().hex[:8]}@remote.test"  # a triplet never seen
        assert result[0] == 250, result
    finally:
        gateway.request("DELETE", "/admin/greylist/whitelist/client/203.0.113.7/32")


def test_dkim_keys_made_through_the_api_list_their_record(gateway: Gateway) -> None:
    status, made = gateway.request("POST", "/admin/dkim/keys", body={
        "domain": "secumail.test", "selector": "gw" + uuid.uuid4().hex[:6],
        "key_type": "ed25519"})
    assert status == 201, made
    _, listed = gateway.request("GET", "/admin/dkim/keys")
    assert {"selector": made["selector"], "record_value": made["record_value"]}.items() <= next(
        k for k in listed if k["selector"] == made["selector"]).items()


def prometheus_query(promql: str) -> list[dict[str, Any]]:
    url = (f"http://{os.environ['SECUMAIL_PROMETHEUS_PUBLISH']}/api/v1/query?"
           + urllib.parse.urlencode({"query": promql}))
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_the_prometheus_profile_scrapes_the_whole_stack(gateway: Gateway, stack: Stack) -> None:
    assert stack.containers("prometheus"), "COMPOSE_PROFILES=prometheus was not in force"

    def three_clamav() -> bool:
        try:
            return len(prometheus_query('secumail_up{service="clamav"} == 1')) == 3
        except OSError:
            return False

    gateway.wait_for(three_clamav, "Prometheus never saw the three clamav replicas", 180)
    [up] = prometheus_query('up{job="secumail"}')
    assert up["value"][1] == "1"  # with the metrics token the profile wrote for it
    dashboard = json.loads((ROOT / "gateway/grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            prometheus_query(target["expr"])  # valid PromQL over the real series


def test_postfix_stops_cleanly_on_sigterm_and_comes_back(gateway: Gateway, stack: Stack) -> None:
    [container] = stack.containers("postfix")
    compose(stack, "stop", "postfix")
    state = stack.inspect(container)["State"]
    assert state["ExitCode"] == 0, stack.logs("postfix")[-3000:]
    assert "postfix stopped" in stack.logs("postfix")
    compose(stack, "start", "postfix")
    stack.wait_healthy(["postfix"])
    gateway.wait_for(lambda: gateway.ready()[0] == 200, "postfix did not come back ready")


def test_a_double_extension_in_a_zip_is_refused_and_a_clean_pdf_passes(
    gateway: Gateway, stack: Stack
) -> None:
    """Issue 19 through the stack (SECUMAIL_ATTACHMENT_ACTION=reject, the default): the
    client's own 554 before-queue, the rule in the ClamAV filter's log and metrics."""
    archive = mail.zipped([("invoice.pdf.exe", mail.PROGRAM)])
    subject = "attachments " + uuid.uuid4().hex[:8]
    banned = mail.attaching([("invoice.zip", archive)], subject=subject + " banned")
    clean = mail.attaching([("report.pdf", b"%PDF-1.4\n%%EOF\n")], subject=subject + " clean")
    code, reply = attempt(stack, "127.0.0.22", "alice@secumail.test", "dave@secumail.test",
                          banned)
    if stack.mode == "before-queue":
        assert code == 554 and b"double-extension: invoice.zip > invoice.pdf.exe" in reply, reply
    code, reply = attempt(stack, "127.0.0.22", "alice@secumail.test", "dave@secumail.test",
                          clean)
    assert code == 250, reply
    deadline = time.monotonic() + 60
    while not [m for m in stack.mailbox("dave") if m["Subject"] == subject + " clean"]:
        assert time.monotonic() < deadline, stack.logs("clamav")[-3000:]
        time.sleep(1)
    assert not [m for m in stack.mailbox("dave") if m["Subject"] == subject + " banned"]
    assert "double-extension: invoice.zip > invoice.pdf.exe" in stack.logs("clamav")
    found = gateway.metrics()
    assert total(found, "secumail_filter_attachment_findings_total",
                 rule="double-extension") >= 1


def learned_spam(container: str) -> int:
    """nspam of the Bayes database a spamassassin container reads (sa-learn as spamd's user)."""
    dump = subprocess.run(["docker", "exec", container, "sa-learn", "--dump", "magic"],
                          capture_output=True, text=True, check=True).stdout
    [line] = [line for line in dump.splitlines() if line.endswith("non-token data: nspam")]
    return int(line.split()[2])


def test_what_one_spamassassin_learned_every_replica_knows_and_keeps(
    stack: Stack, gateway: Gateway
) -> None:
    """Issue 29: Bayes lived inside the container (lost on every recreate, one per replica).
    A spam the admin uploads is learned once, in the bayes volume: a second replica knows
    it, and so does a container made anew (`up -d --force-recreate`)."""
    spam = (f"From: Prize Desk <win@lottery.test>\r\nTo: dave@secumail.test\r\n"
            f"Subject: You won {uuid.uuid4().hex}\r\nMessage-ID: <{uuid.uuid4().hex}@lottery"
            f".test>\r\n\r\nClaim your lottery prize money now, send your bank details.\r\n"
            ).encode()
    request = urllib.request.Request(gateway.base + "/admin/learn/spam", data=spam,
                                     method="POST")
    request.add_header("Authorization", f"Bearer {ADMIN}")
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.loads(response.read()) == {"kind": "spam", "learned": "learned as spam"}
    [first] = stack.containers("spamassassin")
    learned = learned_spam(first)
    assert learned >= 1
    try:
        compose(stack, "up", "-d", "--no-deps", "--no-recreate", "--scale", "spamassassin=2",
                "spamassassin")
        stack.wait_healthy(["spamassassin"])
        second = next(c for c in stack.containers("spamassassin") if c != first)
        assert learned_spam(second) == learned
    finally:
        compose(stack, "up", "-d", "--no-deps", "--force-recreate", "--scale",
                "spamassassin=1", "spamassassin")
        stack.wait_healthy(["spamassassin", "spamd"])
    [anew] = stack.containers("spamassassin")
    assert anew != first and learned_spam(anew) == learned
