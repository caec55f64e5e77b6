"""Policy service benchmark: SecuMail's policy service next to postgrey, same stream, same run.

Replays one mixed stream of Postfix policy requests (new triplets, retries of known ones,
neighbours in the same /24, null senders) over N concurrent connections, as Postfix's
smtpd processes would, and prints requests/s, p50/p99 latency and the server's RSS for
each server, with the ratio. Greylisting only, with the defaults both servers share
(300 s delay, /24 grouping, SQLite vs postgrey's Berkeley DB), logging on as in production.

Then the cost of selective greylisting (issue 19), same stream, same run: SecuMail with SPF
and a DNSBL zone, greylisting every triplet, against the same with every signal on (HELO
lookups, a DNSWL zone, the names Postfix sends), DNS answering from a loopback server
(testkit/dnsserver.py, in a process of its own) that knows the stream's records.

Then the cost of outbound limits (issue 34, `--outbound`): the same inbound stream with the
limits on and off (inbound mail is never counted: only the trusted-client test is added),
and the stream made outbound (its clients moved into SECUMAIL_MYNETWORKS, senders kept) with
the default limits' nine counters at counts no request reaches, against the limits off.

    .venv/bin/python bench/policy_bench.py [--requests 40000] [--connections 20] [--rounds 3]
        [--skip-selective] [--outbound]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from secumail.protocols.policy import encode_request
from testkit.dnsserver import ReplayingDNS
from testkit.processes import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]

BLOCKLIST, WHITELIST = "bl.bench.test", "wl.bench.test"


def client_names(n: int, client: str) -> tuple[str, str]:
    """Postfix's (client_name, reverse_client_name): a third with no rDNS, a third with a
    forward-confirmed static name, a third with a dynamic-looking name that does not."""
    kind = n % 3
    if kind == 0:
        return "unknown", "unknown"
    if kind == 1:
        return f"mail{n % 977}.example.net", f"mail{n % 977}.example.net"
    return "unknown", client.replace(".", "-") + ".dsl.example.net"


def make_stream(count: int, seed: int = 7) -> list[dict[str, str]]:
    """A reproducible mix: 50% new triplets, 35% retries of known ones, 15% null senders."""
    rng = random.Random(seed)
    known: list[tuple[str, str, str]] = []
    stream = []
    for n in range(count):
        roll = rng.random()
        if known and roll < 0.35:
            client, sender, recipient = rng.choice(known)
            client = client.rsplit(".", 1)[0] + f".{rng.randint(1, 254)}"  # same /24
        else:
            octets = (rng.randint(1, 223), rng.randint(0, 255), rng.randint(0, 255))
            client = ".".join(map(str, octets)) + f".{rng.randint(1, 254)}"
            user, domain = rng.randint(1, 10**6), rng.randint(1, 5000)
            sender = "" if roll > 0.85 else f"user{user}@sender{domain}.example"
            recipient = f"rcpt{rng.randint(1, 500)}@secumail.test"
            known.append((client, sender, recipient))
        name, reverse = client_names(n, client)
        stream.append({
            "request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "client_address": client,
            "client_name": name, "reverse_client_name": reverse,
            "helo_name": f"mx{n % 977}.example.net", "sender": sender,
            "recipient": recipient, "recipient_count": "0", "queue_id": "",
            "instance": f"{n:x}.{n % 13}.0", "size": "2048", "sasl_method": "",
            "sasl_username": "", "sasl_sender": "", "encryption_protocol": "",
            "encryption_cipher": "", "encryption_keysize": "0", "etrn_domain": "",
            "stress": "", "ccert_subject": "", "ccert_issuer": "",
            "ccert_fingerprint": "", "ccert_pubkey_fingerprint": "",
            "client_port": str(1024 + n % 60000), "server_address": "127.0.0.1",
            "server_port": "25",
        })
    return stream


def stream_records(stream: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """The DNS the stream needs: SPF for every sender domain (passing the lower half of the
    address space, softfail else), A records for half the HELO names, one client in 20 on
    the DNSBL (below the reject threshold), one in 20 on the DNSWL."""
    records = [(f"sender{d}.example", "TXT", '"v=spf1 ip4:0.0.0.0/1 ~all"')
               for d in range(1, 5001)]
    records += [(f"mx{h}.example.net", "A", "192.0.2.1") for h in range(0, 977, 2)]
    for n, client in enumerate(sorted({r["client_address"] for r in stream})):
        reverse = ipaddress.ip_address(client).reverse_pointer.removesuffix(".in-addr.arpa")
        if n % 20 == 0:
            records.append((f"{reverse}.{BLOCKLIST}", "A", "127.0.0.2"))
        elif n % 20 == 1:
            records.append((f"{reverse}.{WHITELIST}", "A", "127.0.10.2"))
    return records


def _serve_dns(records: list[tuple[str, str, str]], ready: multiprocessing.Queue[str]) -> None:
    server = ReplayingDNS()
    for name, qtype, value in records:
        server.add(name, qtype, value)
    server.start()
    ready.put(server.spec)
    time.sleep(10**6)


def start_dns(records: list[tuple[str, str, str]]) -> tuple[multiprocessing.Process, str]:
    """The loopback DNS server in a process of its own (its own interpreter lock)."""
    ready: multiprocessing.Queue[str] = multiprocessing.Queue()
    process = multiprocessing.Process(target=_serve_dns, args=(records, ready), daemon=True)
    process.start()
    return process, ready.get(timeout=60)


async def replay(port: int, stream: list[bytes], connections: int,
                 answered: list[float] | None = None) -> tuple[float, list[float]]:
    """Send the stream over `connections` sockets; each socket waits for each answer.
    `answered`, if given, gets the time.perf_counter() at which each answer came."""
    latencies: list[float] = []
    shares = [stream[i::connections] for i in range(connections)]

    async def worker(share: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for request in share:
            started = time.perf_counter()
            writer.write(request)
            answer = await reader.readuntil(b"\n\n")
            now = time.perf_counter()
            latencies.append(now - started)
            if answered is not None:
                answered.append(now)
            if not answer.startswith(b"action="):
                raise RuntimeError(f"bad answer {answer!r}")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in shares))
    return time.perf_counter() - started, latencies


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Result:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    rss_mib: float


def measure(name: str, port: int, pid: int, stream: list[bytes], connections: int) -> Result:
    asyncio.run(replay(port, stream[:500], connections))  # warm up (connections, caches)
    elapsed, latencies = asyncio.run(replay(port, stream, connections))
    latencies.sort()
    return Result(
        name, len(stream) / elapsed,
        statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000,
        rss_mib(pid),
    )


Starter = Callable[[Path], tuple[subprocess.Popen[bytes], int]]

# Postgrey's semantics: the configuration the first comparison measures.
PLAIN = {"SECUMAIL_GREYLIST_MODE": "all", "SECUMAIL_SPF_ENABLED": "false"}
LIMITS_OFF = {"SECUMAIL_OUTBOUND_LIMITS": ""}
# The default limits' scopes, kinds and periods, at counts the stream never reaches.
LIMITS_HIGH = {"SECUMAIL_OUTBOUND_LIMITS": ",".join(
    f"{scope}:{kind}:100000000/{period}" for scope, kind, period in (
        ("sender", "messages", "hour"), ("sender", "recipients", "hour"),
        ("sender", "messages", "day"), ("client", "messages", "minute"),
        ("client", "messages", "hour"), ("client", "recipients", "hour"),
        ("user", "messages", "hour"), ("user", "recipients", "hour"),
        ("user", "messages", "day")))}
OUTBOUND_NETWORK = {"SECUMAIL_MYNETWORKS": "10.0.0.0/8,127.0.0.0/8"}


def outbound_stream(stream: list[dict[str, str]]) -> list[dict[str, str]]:
    """The stream sent by 200 hosts of ours (10.0.x.y), each sender kept."""
    return [{**r, "client_address": f"10.0.0.{n % 200 + 1}"}
            for n, r in enumerate(stream)]


def secumail(settings: dict[str, str]) -> Starter:
    return lambda workdir: start_secumail(workdir, settings)


def start_secumail(workdir: Path, settings: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "SECUMAIL_POLICY_LISTEN": f"127.0.0.1:{port}",
        "SECUMAIL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "SECUMAIL_GREYLIST_STORE": f"sqlite:///{workdir}/secumail.sqlite",
        "SECUMAIL_GREYLIST_AUTO_WHITELIST": "5",
        **settings,
    }
    log = open(workdir / "secumail.log", "wb")
    proc = subprocess.Popen([str(ROOT / ".venv/bin/secumail-policy")], env=env, stderr=log)
    wait_for_port(port)
    return proc, port


def start_postgrey(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("postgrey") or "/usr/sbin/postgrey"
    if not os.path.exists(binary):
        raise SystemExit("postgrey is not installed: run scripts/install-deps.sh")
    port = free_port()
    dbdir = workdir / "postgrey"
    dbdir.mkdir()
    shutil.chown(dbdir, "postgrey", "postgrey")
    os.chmod(workdir, 0o755)
    log = open(workdir / "postgrey.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", "--delay=300",
         "--whitelist-clients=/dev/null", "--whitelist-recipients=/dev/null"],
        stdout=log, stderr=log,
    )
    wait_for_port(port)
    return proc, port


def run_rounds(
    servers: list[tuple[str, Starter]], stream: list[bytes], rounds: int, connections: int
) -> list[Result]:
    """Each round starts every server afresh, one after the other: a machine that slows
    down for a while (a shared host) slows them all; each figure's median is reported."""
    results: dict[str, list[Result]] = {name: [] for name, _ in servers}
    for _ in range(rounds):
        for name, start in servers:
            workdir = Path(tempfile.mkdtemp(prefix="secumail-bench-"))
            proc, port = start(workdir)
            try:
                results[name].append(measure(name, port, proc.pid, stream, connections))
            finally:
                proc.terminate()
                proc.wait(30)
                shutil.rmtree(workdir, ignore_errors=True)
    for name, by_round in results.items():
        print(f"  {name} req/s by round: " + ", ".join(f"{r.rate:.0f}" for r in by_round))
    first, *others = results.values()
    for other in others:  # each round's pair, run a minute apart: the drift between rounds
        ratios = [b.rate / a.rate for a, b in zip(first, other, strict=True)]  # cancels out
        print(f"  {other[0].name} / {first[0].name} by round: "
              + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.2f})")
    return [median_result(by_round) for by_round in results.values()]


def print_table(medians: list[Result]) -> None:
    print(f"{'server':<32}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'RSS MiB':>10}")
    for r in medians:
        print(f"{r.name:<32}{r.rate:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.rss_mib:>10.1f}")


def ratio(ours: Result, peer: Result) -> str:
    return (f"{ours.rate / peer.rate:.2f}x requests/s, p50 {ours.p50_ms / peer.p50_ms:.2f}x, "
            f"p99 {ours.p99_ms / peer.p99_ms:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server, alternated")
    parser.add_argument("--skip-selective", action="store_true",
                        help="only the comparison with postgrey")
    parser.add_argument("--outbound", action="store_true",
                        help="only the cost of outbound limits, postgrey beside it")
    args = parser.parse_args()
    requests = make_stream(args.requests)
    stream = [encode_request(r) for r in requests]
    print(f"policy benchmark: {args.requests} requests over {args.connections} connections, "
          f"median of {args.rounds} rounds")
    if args.outbound:
        return outbound_cost(requests, stream, args.rounds, args.connections)
    plain, peer = run_rounds([("secumail-policy", secumail(PLAIN)),
                              ("postgrey", start_postgrey)], stream, args.rounds, args.connections)
    print_table([plain, peer])
    print(f"ratio secumail/postgrey: {ratio(plain, peer)}")
    if args.skip_selective:
        return
    dns_process, dns = start_dns(stream_records(requests))
    checks = {"SECUMAIL_DNS_SERVERS": dns, "SECUMAIL_SPF_ENABLED": "true",
              "SECUMAIL_DNSBL_ZONES": f"{BLOCKLIST}*0.5", "SECUMAIL_DNSBL_THRESHOLD": "1"}
    try:
        print("selective greylisting: SPF and a DNSBL zone in both, DNS from loopback")
        every_triplet, selective = run_rounds([
            ("greylisting all, SPF, DNSBL", secumail({**checks, "SECUMAIL_GREYLIST_MODE": "all"})),
            ("selective, every signal", secumail({
                **checks, "SECUMAIL_GREYLIST_MODE": "selective",
                "SECUMAIL_GREYLIST_DNSWL_ZONES": f"{WHITELIST}*-2",
                "SECUMAIL_GREYLIST_KNOWN_SENDERS": "sender1.example, sender2.example"})),
        ], stream, args.rounds, args.connections)
    finally:
        dns_process.terminate()
    print_table([every_triplet, selective])
    print(f"ratio selective/all, same checks: {ratio(selective, every_triplet)}")
    print(f"ratio selective/plain greylisting (first table): {ratio(selective, plain)}")


def outbound_cost(requests: list[dict[str, str]], stream: list[bytes], rounds: int,
                  connections: int) -> None:
    print("outbound limits: inbound stream, limits off and on (the default limits)")
    off, on, peer = run_rounds([
        ("inbound, limits off", secumail({**PLAIN, **LIMITS_OFF})),
        ("inbound, limits on", secumail(PLAIN)),
        ("postgrey", start_postgrey)], stream, rounds, connections)
    print_table([off, on, peer])
    print(f"ratio inbound limits on/off: {ratio(on, off)}")
    print(f"ratio secumail (limits on)/postgrey: {ratio(on, peer)}")
    print("outbound limits: the stream from 200 hosts of ours, nine counters each request")
    ours = [encode_request(r) for r in outbound_stream(requests)]
    trusted_off, counted = run_rounds([
        ("outbound, limits off", secumail({**PLAIN, **LIMITS_OFF, **OUTBOUND_NETWORK})),
        ("outbound, counted", secumail({**PLAIN, **LIMITS_HIGH, **OUTBOUND_NETWORK})),
    ], ours, rounds, connections)
    print_table([trusted_off, counted])
    print(f"ratio outbound counted/limits off: {ratio(counted, trusted_off)}")
    print(f"ratio outbound counted/postgrey (inbound): {ratio(counted, peer)}")


def median_result(results: list[Result]) -> Result:
    """Each figure's median over the rounds."""
    return Result(
        results[0].name,
        statistics.median(r.rate for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        statistics.median(r.rss_mib for r in results),
    )


if __name__ == "__main__":
    main()
