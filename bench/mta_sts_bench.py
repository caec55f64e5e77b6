"""MTA-STS for mail leaving SecuMail (issue 34): what the policy lookup adds to each
outbound delivery.

With SECUMAIL_OUTBOUND_MTA_STS on, Postfix's smtp client asks the resolver beside it
(postfix-mta-sts-resolver, on a socketmap) for the destination's policy at each delivery.
Its peer is the same Postfix without the lookup, in the same run. Two destinations:
- no policy (most of the world): the resolver asks DNS for `_mta-sts.<domain>` each time (it
  keeps no negative answer) and answers nothing; peer: Postfix with TLS `may` alone;
- an enforce policy (fetched once over HTTPS, then kept for its max_age): TLS required and
  the certificate verified against the policy's MX; peer: Postfix with the same `secure`
  policy written in an inline table (the same TLS work, no lookup).
Everything runs in a network namespace of the bench's own, whose resolv.conf names a DNS
server of the bench's (the resolver reads resolv.conf; nothing leaves the machine). Prints
msg/s (N messages submitted over SMTP, until the sink has them all) and the ratio to the
peer; then the resolver alone: socketmap questions asked one at a time, p50/p99 latency, its
CPU per question and RSS.

    .venv/bin/python bench/mta_sts_bench.py [--messages 500]    (as root: ip netns)
"""

from __future__ import annotations

import argparse
import multiprocessing
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from dkim_bench import cpu_seconds
from resolver_bench import rss_kib

from services.postfix.outbound_tls import daemon_config
from testkit.dnsserver import ReplayingDNS
from testkit.postfix import PostfixInstance
from testkit.processes import wait_for_port
from testkit.sink import SinkHandler
from testkit.tls import write_test_pki

ROOT = Path(__file__).resolve().parents[1]

NAMESPACE = "secumail-mta-sts-bench"
NO_POLICY, STS = "nopolicy.bench.test", "sts.bench.test"
# Each destination's MX: a sink on port 25 of its own loopback address (not Postfix's
# 127.0.0.1, which would be mail looping back to itself).
SINKS = {NO_POLICY: "127.0.0.2", STS: "127.0.0.3"}
POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.bench.test\r\nmax_age: 86400\r\n"
SOCKETMAP = "socketmap:inet:127.0.0.1:8461:postfix"


def _serve_dns() -> None:
    server = ReplayingDNS(port=53)
    for domain, address in SINKS.items():
        server.add(f"mx.{domain}", "A", address)
    server.add(f"mta-sts.{STS}", "A", "127.0.0.1")
    for domain in (NO_POLICY, STS):
        server.add(domain, "MX", f"10 mx.{domain}.")
    server.add(f"_mta-sts.{STS}", "TXT", '"v=STSv1; id=bench1"')
    server.start()
    while True:
        time.sleep(3600)


def run_postfix(main: dict[str, str], domain: str, messages: int, sink: SinkHandler) -> float:
    """msg/s: `messages` submitted to a fresh Postfix for `domain`, until all arrived."""
    postfix = PostfixInstance({"smtp_dns_support_level": "enabled", **main}).start()
    before = len(sink.messages)
    try:
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", postfix.port) as client:
            for n in range(messages):
                client.sendmail("bench@secumail.test", [f"user{n % 50}@{domain}"],
                                f"Subject: bench {n}\r\n\r\nHello.\r\n")
        deadline = time.monotonic() + 300
        with sink.arrived:
            while len(sink.messages) - before < messages:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(sink.messages) - before} of {messages} "
                                     f"arrived:\n{postfix.log()[-3000:]}")
                sink.arrived.wait(1)
        elapsed = time.perf_counter() - started
        if domain == STS and "Verified TLS connection established" not in postfix.log():
            tls_lines = [line for line in postfix.log().splitlines() if "TLS" in line]
            raise SystemExit(f"not delivered over verified TLS: {tls_lines[-5:]}")
        return messages / elapsed
    finally:
        postfix.stop()


def ask(domain: str, connection: socket.socket) -> float:
    """One socketmap question; its latency in ms."""
    request = f"postfix {domain}".encode()
    started = time.perf_counter()
    connection.sendall(f"{len(request)}:".encode() + request + b",")
    answer = b""
    while not answer.endswith(b","):
        answer += connection.recv(4096)
    return (time.perf_counter() - started) * 1000


def inside(messages: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="secumail-sts-bench-"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    multiprocessing.Process(target=_serve_dns, daemon=True).start()
    write_test_pki(work / "tls", issued={"mx": [f"mx.{STS}"], "web": [f"mta-sts.{STS}"]},
                   self_signed={})
    (work / "policies" / f"mta-sts.{STS}").mkdir(parents=True)
    (work / "policies" / f"mta-sts.{STS}" / "mta-sts.txt").write_text(POLICY)
    (work / "daemon.yml").write_text(daemon_config(work / "policies.sqlite"))
    ca = str(work / "tls" / "ca.pem")
    host = subprocess.Popen([sys.executable, str(ROOT / "tests/e2e/policy_host.py"),
                             str(work / "policies"), str(work / "tls/web.pem"),
                             str(work / "tls/web.key")], stderr=subprocess.DEVNULL)
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "mta-sts-daemon"), "-v",
                               "error", "-c", str(work / "daemon.yml")],
                              env={"SSL_CERT_FILE": ca, "PATH": "/usr/bin:/bin"})
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(work / "tls/mx.pem", work / "tls/mx.key")
    sink = SinkHandler()
    sinks = [Controller(sink, hostname=SINKS[NO_POLICY], port=25),
             Controller(sink, hostname=SINKS[STS], port=25, tls_context=tls,
                        require_starttls=True)]
    try:
        for controller in sinks:
            controller.start()
        wait_for_port(443)
        wait_for_port(8461)
        tls_main = {"smtp_tls_CAfile": ca, "smtp_tls_loglevel": "1",
                    "smtp_tls_security_level": "may"}
        rows = []
        for label, domain, peer_map in (
            ("no policy", NO_POLICY, ""),
            ("enforce policy", STS, f"inline:{{ {{ {STS} = secure match=mx.{STS} }} }}"),
        ):
            peer = run_postfix({**tls_main, "smtp_tls_policy_maps": peer_map}, domain,
                               messages, sink)
            cpu = cpu_seconds(daemon.pid)
            ours = run_postfix({**tls_main, "smtp_tls_policy_maps": SOCKETMAP}, domain,
                               messages, sink)
            rows.append((label, ours, peer, (cpu_seconds(daemon.pid) - cpu) / messages))
        print(f"Postfix delivering {messages} messages each, in one run:")
        for label, ours, peer, cpu in rows:
            print(f"  {label:15} with MTA-STS {ours:7.1f} msg/s   without (peer) "
                  f"{peer:7.1f} msg/s   ratio {ours / peer:.2f}x   resolver CPU "
                  f"{cpu * 1e6:.0f} us/message")
        print("The resolver alone, 2000 socketmap questions one at a time:")
        for label, domain in (("no policy", NO_POLICY), ("enforce policy", STS)):
            cpu = cpu_seconds(daemon.pid)
            with socket.create_connection(("127.0.0.1", 8461)) as connection:
                times = sorted(ask(domain, connection) for _ in range(2000))
            spent = (cpu_seconds(daemon.pid) - cpu) / 2000
            print(f"  {label:15} {1000 / statistics.mean(times):7.0f} questions/s   p50 "
                  f"{times[1000]:.3f} ms   p99 {times[1980]:.3f} ms   CPU "
                  f"{spent * 1e6:.0f} us/question")
        print(f"  resolver RSS {rss_kib(daemon.pid) / 1024:.1f} MiB")
    finally:
        for controller in sinks:
            controller.stop()
        for process in (daemon, host):
            process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.messages)
        return
    # A namespace of our own: its loopback only, and `ip netns exec` mounts its resolv.conf.
    subprocess.run(["ip", "netns", "delete", NAMESPACE], capture_output=True)
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    etc = Path("/etc/netns") / NAMESPACE
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    try:
        subprocess.run(["ip", "netns", "exec", NAMESPACE, sys.executable, __file__,
                        "--inside", "--messages", str(args.messages)], check=True)
    finally:
        subprocess.run(["ip", "netns", "delete", NAMESPACE], capture_output=True)
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()


if __name__ == "__main__":
    main()
