"""Where did my mail go? Messages sent through the compose stack (three clamav replicas,
two spamd replicas), each found by one tracking search with its path and where it ended,
through the API and through secumail-track in the gateway's container."""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from testkit import mail
from tests.e2e.conftest import Stack
from tests.e2e.test_gateway import Gateway
from tests.e2e.test_stack import BOT_HELO, attempt, deliver

GOOD_NAME = "mail.remote.test"  # forward-confirmed in the test DNS: not greylisted
CLIENT = "198.18.0.81"  # the greylisted client (RFC 2544's benchmarking range)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return Gateway(stack)


def track(gateway: Gateway, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 60,
          **criteria: str) -> list[dict[str, Any]]:
    """The search's messages once `until` holds for them (events are collected every 2 s;
    a delivery is logged a moment after the client's 250)."""
    query = urllib.parse.urlencode(criteria)
    deadline = time.monotonic() + timeout
    while True:
        status, answer = gateway.request("GET", f"/admin/tracking?{query}")
        assert status == 200, answer
        messages: list[dict[str, Any]] = answer["messages"]
        if until(messages):
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"{criteria}: {messages}\n{gateway.stack.logs('gateway')[-3000:]}")
        time.sleep(1)


def path(message: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["service"], e["outcome"]) for e in message["events"]]


def ended(outcome: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda messages: len(messages) == 1 and messages[0]["outcome"] == outcome


def test_a_greylisted_message_is_one_path_from_its_first_try_to_its_mailbox(
        gateway: Gateway, stack: Stack) -> None:
    # A network and a sender domain (no SPF) no other test uses: other tests' passes have
    # auto-whitelisted 203.0.113.0/24 by the time this one runs in the whole suite.
    sender = f"grey.{uuid.uuid4().hex[:8]}@sender.test"
    message = mail.plain(subject=f"tracked {sender}", sender=sender)
    assert attempt(stack, CLIENT, sender, "bob@secumail.test", message,
                   helo=BOT_HELO)[0] == 450
    time.sleep(3)
    assert attempt(stack, CLIENT, sender, "bob@secumail.test", message,
                   helo=BOT_HELO)[0] == 250
    [found] = track(gateway, ended("delivered"), sender=sender)
    steps = path(found)
    assert steps[:2] == [("policy", "greylisted"), ("postfix", "greylisted")], steps
    for step in (("policy", "passed"), ("clamav", "passed"), ("spamd", "passed"),
                 ("dkim", "passed"), ("postfix", "accepted"), ("postfix", "delivered")):
        assert step in steps, (step, steps)
    assert steps.index(("clamav", "passed")) < steps.index(("spamd", "passed"))
    assert found["client"] == CLIENT and found["recipients"] == ["bob@secumail.test"]
    assert found["queue_ids"] and found["message_id"]
    replicas = {e["service"]: e["replica"] for e in found["events"]}
    assert replicas["clamav"].startswith("secumail-e2e-clamav-"), replicas  # container names
    # The same message by its other handles.
    for criteria in ({"message_id": found["message_id"]}, {"queue_id": found["queue_ids"][0]},
                     {"recipient": "bob@secumail.test", "client": CLIENT}):
        assert any(m["events"] == found["events"]
                   for m in track(gateway, lambda ms: bool(ms), **criteria)), criteria
    shell = stack.exec("gateway", "secumail-track", "--sender", sender)
    assert shell.returncode == 0, shell.stderr
    assert "DELIVERED" in shell.stdout and "greylisted" in shell.stdout, shell.stdout


@pytest.mark.parametrize(("what", "recipient", "code", "outcome", "refused_by"), [
    ("virus", "bob@secumail.test", 554, "refused", "clamav"),
    ("gtube", "bob@secumail.test", 554, "refused", "spamd"),
    ("relay", "carol@elsewhere.test", 554, "refused", "postfix"),
    ("unknown mailbox", "nobody@secumail.test", 550, "refused", "postfix"),
])
def test_refused_mail_is_found_with_who_refused_it(
        gateway: Gateway, stack: Stack, what: str, recipient: str, code: int, outcome: str,
        refused_by: str) -> None:
    sender = f"{what.split()[0]}.{uuid.uuid4().hex[:8]}@remote.test"
    body = {"virus": mail.eicar, "gtube": mail.gtube}.get(what, mail.plain)()
    answer = deliver(stack, "203.0.113.82", sender, recipient, body, name=GOOD_NAME)
    assert answer[0] == code, answer
    [found] = track(gateway, ended(outcome), sender=sender)
    assert (refused_by, "refused") in path(found), path(found)
    assert ("postfix", "delivered") not in path(found)
    assert found["client"] == "203.0.113.82"


def test_an_spf_fail_is_found_by_its_client(gateway: Gateway, stack: Stack) -> None:
    since = time.time()
    code, reply = attempt(stack, "203.0.113.83", "ceo@bank.test", "bob@secumail.test")
    assert code == 550, reply
    [found] = track(gateway, ended("refused"), client="203.0.113.83", since=str(since))
    assert path(found) == [("policy", "refused"), ("postfix", "refused")], path(found)
    assert "spf" in found["events"][0]["detail"].lower()


@pytest.mark.parametrize("path", ["/console/tracking?sender=a%40remote.test",
                                  "/console/quarantine", "/console/quarantine/x",
                                  "/console/greylist", "/console/health"])
def test_the_console_shows_nothing_without_a_session(gateway: Gateway, path: str) -> None:
    for token in (None, "e2e-admin-token-0123456789"):  # a bearer token is no session
        status, body = gateway.request("GET", path, token=token)
        assert status == 401 and 'action="/console/login"' in body, (path, status)


@pytest.mark.parametrize("path", ["/console/quarantine/x/release", "/console/quarantine/x/delete",
                                  "/console/greylist/whitelist",
                                  "/console/greylist/whitelist/remove", "/console/logout"])
def test_the_console_refuses_every_action_without_a_session(gateway: Gateway, path: str
                                                            ) -> None:
    status, _ = gateway.request("POST", path, token=None)
    assert status == 403, (path, status)


def test_only_the_gateway_reads_a_services_events(gateway: Gateway, stack: Stack) -> None:
    """Another container on the policy service's network (the test sink) is refused its
    events, which hold addresses; the gateway collects them (the tests above)."""
    script = ("import urllib.request, urllib.error\n"
              "try:\n"
              "    urllib.request.urlopen('http://policy:9100/events', timeout=10)\n"
              "    print('read')\n"
              "except urllib.error.HTTPError as error:\n"
              "    print(error.code)\n")
    result = stack.exec("sink", "/opt/secumail/bin/python", "-c", script)
    assert result.stdout.strip() == "403", (result.stdout, result.stderr)
