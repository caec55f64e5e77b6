"""secumail-policy as a real process over TCP, with the test's own DNS server and Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secumail import probes
from testkit.dnsserver import LoopbackDNS
from testkit.policy_client import PolicyClient, rcpt_request
from testkit.processes import (
    VENV_BIN,
    Daemon,
    free_port,
    policy_env,
    rss_kib,
    scrape,
    start_policy,
)

StartPolicy = Callable[..., tuple[Daemon, int]]


@pytest.fixture
def policy(tmp_path: Path, dns_server: LoopbackDNS) -> Iterator[StartPolicy]:
    """Start secumail-policy processes with settings overrides; all stopped at the end."""
    daemons: list[Daemon] = []

    def start(store: str = "", **overrides: str) -> tuple[Daemon, int]:
        port = free_port()
        store = store or f"sqlite:///{tmp_path}/greylist-{port}.sqlite"
        env = policy_env(port, store, dns_server.spec, **overrides)
        daemon = start_policy(env)
        daemons.append(daemon)
        return daemon, port

    yield start
    for daemon in daemons:
        daemon.stop()


def metrics(daemon: Daemon) -> str:
    return scrape(daemon.metrics_port)


def test_greylisting_round_trip(policy: StartPolicy) -> None:
    daemon, port = policy(greylist_delay="1", spf_enabled="false")
    client = PolicyClient(port)
    assert client.ask(rcpt_request(instance="1")) == (
        "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in 1 seconds"
    )
    time.sleep(1.2)
    action = client.ask(rcpt_request(instance="2"))
    assert action.startswith(
        "PREPEND X-Greylist: delayed 1 seconds by SecuMail at mx.secumail.test;"
    )
    assert client.ask(rcpt_request(instance="3")) == "DUNNO"
    exposition = metrics(daemon)
    assert 'secumail_policy_decisions_total{action="defer",check="greylist"} 1.0' in exposition
    assert 'secumail_policy_decisions_total{action="prepend",check="greylist"} 1.0' in exposition
    assert "secumail_policy_request_duration_seconds_count 3.0" in exposition
    assert daemon.logged("decision") and daemon.logged("check=greylist")


def test_selective_greylisting_logs_and_counts_its_signals(
    policy: StartPolicy, dns_server: LoopbackDNS
) -> None:
    """Over the real socket, the signals' DNS asked of a real DNS server (in parallel with
    SPF and the DNSBL); the decision's reasons in the log line and the metrics."""
    dns_server.add("remote.test", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    dns_server.add("mail.remote.test", "A", "203.0.113.7")
    dns_server.add("7.113.0.203.wl.test", "A", "127.0.10.3")
    dns_server.add("20.100.51.198.grey.test", "A", "127.0.0.2")
    daemon, port = policy(greylist_mode="selective", greylist_dnswl_zones="wl.test*-1",
                          dnsbl_zones="grey.test*0.5", dnsbl_threshold="2")
    client = PolicyClient(port)
    provider = client.ask(rcpt_request(instance="p"))
    assert provider.startswith("PREPEND X-Greylist: not delayed by SecuMail at mx.secumail.test, "
                               "score -2 (dnswl -1, spf-pass -1); "), provider
    bot = rcpt_request(instance="b", client_address="198.51.100.20", client_name="unknown",
                       reverse_client_name="unknown", helo_name="qz81k.remote.test",
                       sender="x@nospf.test")
    assert client.ask(bot).startswith("DEFER_IF_PERMIT 4.7.1 Greylisted")
    assert daemon.logged("score 3.5 (no-rdns +2, helo-unresolved +1, dnsbl +0.5)")
    exposition = metrics(daemon)
    for line in ('secumail_policy_greylist_scores_total{decision="passed"} 1.0',
                 'secumail_policy_greylist_scores_total{decision="greylisted"} 1.0',
                 'secumail_policy_greylist_signals_total{signal="no-rdns"} 1.0',
                 'secumail_policy_greylist_signals_total{signal="dnswl"} 1.0'):
        assert line in exposition, exposition


def test_health_probes_answer_dunno_without_a_log_line(policy: StartPolicy) -> None:
    daemon, port = policy(spf_enabled="false")
    probe, _ = probes.PROBES["policy"]
    assert asyncio.run(probe(f"127.0.0.1:{port}", 5)) == "action=DUNNO"
    assert PolicyClient(port).ask(rcpt_request()).startswith("DEFER_IF_PERMIT")
    assert daemon.logged("state=RCPT")  # the request after the probe is logged...
    assert "state=VRFY" not in daemon.output()  # ...the probe is not


def test_spf_and_dnsbl_through_the_test_dns(policy: StartPolicy, dns_server: LoopbackDNS) -> None:
    dns_server.add("remote.test", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    dns_server.add("bank.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    dns_server.add("66.113.0.203.rbl.test", "A", "127.0.0.4")
    _, port = policy(greylist_enabled="false", dnsbl_zones="rbl.test")
    client = PolicyClient(port)
    assert client.ask(rcpt_request()) == "DUNNO"
    header = client.ask(rcpt_request(protocol_state="DATA"))
    assert header.startswith("PREPEND Received-SPF: pass (mx.secumail.test: domain of remote.test")
    assert client.ask(rcpt_request(sender="ceo@bank.test")).startswith(
        "550 5.7.23 SPF check failed"
    )
    assert client.ask(rcpt_request(client_address="203.0.113.66")) == (
        "554 5.7.1 Service unavailable; client [203.0.113.66] blocked using rbl.test"
    )
    asked = {name for name, _ in dns_server.resolver.queries}
    assert {"remote.test", "bank.test", "66.113.0.203.rbl.test"} <= asked


def test_dns_timeout_defers_and_service_keeps_serving(
    policy: StartPolicy, dns_server: LoopbackDNS
) -> None:
    dns_server.make_slow("slow.test")
    _, port = policy(greylist_enabled="false", dnsbl_zones="slow.test", dns_timeout="0.5")
    slow = PolicyClient(port)
    assert slow.ask(rcpt_request()).startswith("DEFER_IF_PERMIT 4.7.1 Service temporarily")
    _, open_port = policy(
        greylist_enabled="false",
        dnsbl_zones="slow.test",
        dns_timeout="0.5",
        policy_fail_open="true",
        spf_enabled="false",
    )
    assert PolicyClient(open_port).ask(rcpt_request()) == "DUNNO"


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 4,
        b"request=smtpd_access_policy\nnot an attribute\n\n",
        b"sender=" + b"A" * 100_000,
        b"request=smtpd_access_policy\nfavourite=blue\n\n",
        b"request=other_request\n\n",
    ],
)
def test_junk_closes_that_connection_only(policy: StartPolicy, junk: bytes) -> None:
    daemon, port = policy(spf_enabled="false")
    bystander = PolicyClient(port)
    assert bystander.ask(rcpt_request(client_address="198.51.100.1")).startswith("DEFER_IF_PERMIT")
    offender = PolicyClient(port)
    offender.sock.sendall(junk)
    assert offender.closed_by_peer()
    assert bystander.ask(rcpt_request(client_address="198.51.100.2")).startswith("DEFER_IF_PERMIT")
    assert daemon.logged("closing connection")
    assert "secumail_policy_protocol_errors_total" in metrics(daemon)


def test_idle_and_half_sent_requests_are_dropped_memory_bounded(policy: StartPolicy) -> None:
    daemon, port = policy(spf_enabled="false", policy_idle_timeout="3", policy_max_connections="50")
    before = rss_kib(daemon.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
    for sock in idle[:200]:
        sock.sendall(b"request=smtpd_access_policy\nsender=never-finished")
    # Over the cap, connections are refused at once (the cap is far below the 400 so that it is
    # reached even when accepting is slow); the idle ones go after 3 s; the service still answers.
    time.sleep(1.5)
    for sock in idle:
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the service: over the cap, idle or half-sent
        sock.close()
    assert PolicyClient(port).ask(rcpt_request()).startswith("DEFER_IF_PERMIT")
    after = rss_kib(daemon.proc.pid)
    assert after - before < 20_000, (before, after)
    assert daemon.logged("too many connections")
    assert daemon.logged("nothing received for 3 s")


def test_sigterm_finishes_the_request_in_flight(
    policy: StartPolicy, dns_server: LoopbackDNS
) -> None:
    dns_server.make_slow("slow.test")
    daemon, port = policy(
        greylist_enabled="false", spf_enabled="false", dnsbl_zones="slow.test", dns_timeout="1.5"
    )
    client = PolicyClient(port)
    answers: list[str] = []
    asking = threading.Thread(target=lambda: answers.append(client.ask(rcpt_request())))
    asking.start()
    time.sleep(0.5)
    daemon.proc.terminate()
    asking.join(10)
    assert answers and answers[0].startswith("DEFER_IF_PERMIT")
    assert daemon.proc.wait(10) == 0
    assert daemon.logged("draining")


def test_redis_store_is_shared_by_replicas(policy: StartPolicy, redis_url: str) -> None:
    _, port_a = policy(redis_url, greylist_delay="1", spf_enabled="false")
    _, port_b = policy(redis_url, greylist_delay="1", spf_enabled="false")
    assert PolicyClient(port_a).ask(rcpt_request()).startswith("DEFER_IF_PERMIT")
    time.sleep(1.2)
    assert PolicyClient(port_b).ask(rcpt_request()).startswith("PREPEND X-Greylist: delayed 1")


def test_outbound_counters_are_shared_by_replicas_and_lose_no_count_under_concurrency(
    policy: StartPolicy, redis_url: str
) -> None:
    """Two policy replicas on one Redis, 20 clients at once (10 on each), 300 messages from
    one host of ours against its limit of 100: exactly 100 get through. Then the hold: a
    sender past 3 times its limit is held on both replicas until released."""
    limits = "client:messages:100/hour,sender:messages:5/hour"
    common = {"spf_enabled": "false", "outbound_limits": limits,
              "outbound_hold_factor": "3"}
    daemon_a, port_a = policy(redis_url, **common)
    _, port_b = policy(redis_url, **common)
    answers: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        asker = PolicyClient(port_a if n % 2 else port_b)
        for m in range(15):
            action = asker.ask(rcpt_request(client_address="127.0.0.9", instance=f"{n}.{m}",
                                            sender=f"s{n}.{m}@secumail.test"))
            with lock:
                answers.append(action)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 300
    assert answers.count("DUNNO") == 100, {a: answers.count(a) for a in set(answers)}
    assert all(a.startswith("450 4.7.1 Outbound limit reached: 100 messages per hour for "
                            "client:127.0.0.9") for a in answers if a != "DUNNO")

    spam = {"client_address": "127.0.0.10", "sender": "spam@secumail.test"}
    tries = [PolicyClient(port_a if n % 2 else port_b).ask(rcpt_request(
        instance=f"spam{n}", **spam)) for n in range(16)]
    assert tries[:5] == ["DUNNO"] * 5 and "Outbound limit reached" in tries[5]
    assert tries[15] == ("450 4.7.1 Outbound mail held for sender:spam@secumail.test (far "
                         "over its limits): ask the postmaster to release it")
    assert "Outbound mail held" in PolicyClient(port_b).ask(rcpt_request(instance="x", **spam))
    # Told once, by the replica that held it (the 16th try went to replica a).
    assert 'secumail_policy_outbound_holds_total{scope="sender"} 1.0' in metrics(daemon_a)
    assert daemon_a.logged("outbound sender held")
    import redis

    held = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(
        "secumail:outbound:held")
    assert list(held) == ["sender:spam@secumail.test"]


def test_a_never_passed_triplet_lasts_only_its_retry_window_in_redis(
    policy: StartPolicy, redis_url: str
) -> None:
    """Issue 30: every one-off sender's triplet was kept 35 days (SECUMAIL_GREYLIST_MAX_AGE),
    though a retry after the retry window starts over: Redis filled with them."""
    import redis

    _, port = policy(redis_url, greylist_retry_window="3600", spf_enabled="false")
    assert PolicyClient(port).ask(rcpt_request()).startswith("DEFER_IF_PERMIT")
    client = redis.Redis.from_url(redis_url)
    [key] = client.keys("secumail:greylist:t:*")
    assert 3500 < client.ttl(key) <= 3601


def test_unreachable_redis_defers_and_the_service_stays_up(policy: StartPolicy) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    daemon, port = policy(dead, spf_enabled="false")
    client = PolicyClient(port)
    for _ in range(3):
        assert client.ask(rcpt_request()).startswith("DEFER_IF_PERMIT 4.7.1 Service temporarily")
    assert daemon.proc.poll() is None
    assert daemon.logged("check failed")


def test_bad_setting_stops_the_service_naming_the_variable() -> None:
    env = {**os.environ, "SECUMAIL_GREYLIST_DELAY": "soon"}
    result = subprocess.run(
        [str(VENV_BIN / "secumail-policy")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "SECUMAIL_GREYLIST_DELAY" in result.stderr


def test_module_runs_without_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import services.policy.main as m; print(m.main.__doc__ is None)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_one_retried_session_does_not_whitelist_a_network(
    policy: StartPolicy, store: str, request: pytest.FixtureRequest
) -> None:
    """Issue 13, item 10: a bot's one session with five recipients (which need not exist:
    Postfix checks recipients after the policy answer), retried once, used to count five
    passes and whitelist its whole /24 for 35 days. Postgrey counts one pass an hour."""
    url = request.getfixturevalue("redis_url") if store == "redis" else ""
    _, port = policy(store=url, greylist_delay="0", spf_enabled="false")
    client = PolicyClient(port)
    recipients = [f"nobody{n}@secumail.test" for n in range(5)]
    answers = {
        attempt: [client.ask(rcpt_request(instance=attempt, recipient=recipient,
                                          client_address="198.51.100.20"))
                  for recipient in recipients]
        for attempt in ("first", "retry")
    }
    assert all(a.startswith("DEFER_IF_PERMIT") for a in answers["first"])
    # Every triplet passes; the header goes with the first (one per transaction).
    assert answers["retry"][0].startswith("PREPEND X-Greylist")
    assert answers["retry"][1:] == ["DUNNO"] * 4
    # A new sender and recipient from the bot's network: greylisted like any stranger.
    stranger = rcpt_request(instance="next", sender="other@elsewhere.test",
                            recipient="bob@secumail.test", client_address="198.51.100.21")
    assert client.ask(stranger).startswith("DEFER_IF_PERMIT 4.7.1 Greylisted")


def trickled_until_closed(port: int, start: bytes, seconds: float = 8) -> bool:
    """Start a request, then send one more byte every 0.25 s: whether the peer hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(start)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
            except OSError:
                return True
            time.sleep(0.25)
    return False


def test_a_trickled_request_is_dropped(policy: StartPolicy) -> None:
    """Issue 13, item 7: the idle deadline restarts with every byte, so a request sent a
    byte at a time held its connection for ever; a started request now has its own."""
    daemon, port = policy(spf_enabled="false", request_timeout="1")
    assert trickled_until_closed(port, b"request=smtpd_access_policy\nsender=")
    assert daemon.logged("a request still unfinished after 1 s")
    assert PolicyClient(port).ask(rcpt_request()).startswith("DEFER_IF_PERMIT")

