"""Postfix's resolver (issue 32): what the forwarder adds to each of Postfix's DNS lookups.

With SECUMAIL_DNS_SERVERS set, Postfix's lookups (the client's PTR and its forward
confirmation, the sender's domain, the HELO name) cross the forwarder of its container
(secumail/dns_forwarder.py) before the DNS server. Its peer is the same DNS server asked
directly, as Postfix asks Docker's DNS without the setting. One client asks as the C
library does, one question at a time over UDP, from `--clients` threads at once; the DNS
server (testkit/dnsserver.py ReplayingDNS, in a process of its own) answers from
memory, so what differs is the forwarder. Prints queries/s, p50/p99 latency, the
forwarder's CPU per query and RSS, and the ratio.

    .venv/bin/python bench/resolver_bench.py [--queries 20000] [--clients 8]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
from dkim_bench import cpu_seconds

from testkit.dnsserver import ReplayingDNS
from testkit.processes import free_port

ROOT = Path(__file__).resolve().parents[1]

NAMES = 500  # distinct names, each asked again and again (as a resolver's cache would see)

FORWARDER = """
import asyncio, socket, sys
from secumail.dns_forwarder import Forwarder
from secumail.dns_forwarder import serve
from secumail.netaddr import HostPort, parse_network
port, upstream = int(sys.argv[1]), int(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", port))
tcp = socket.socket(); tcp.bind(("127.0.0.1", port)); tcp.listen(8)
forwarder = Forwarder([HostPort("127.0.0.1", upstream)], [HostPort("127.0.0.11", 53)],
                      [parse_network("172.29.126.0/24")], 5.0)
asyncio.run(serve(forwarder, udp, tcp))
"""


def _serve_dns(ready: multiprocessing.Queue[int]) -> None:
    server = ReplayingDNS()
    for n in range(NAMES):
        server.add(f"mail{n}.lab.test", "A", f"192.0.2.{n % 250 + 1}")
    server.start()
    ready.put(server.address[1])
    while True:
        time.sleep(3600)


def ask_all(port: int, queries: int, clients: int) -> tuple[float, list[float]]:
    wires = [dns.message.make_query(f"mail{n % NAMES}.lab.test.", "A").to_wire()
             for n in range(queries)]

    def one_client(part: list[bytes]) -> list[float]:
        times = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            for wire in part:
                started = time.perf_counter()
                sock.send(wire)
                answer = sock.recv(4096)
                times.append(time.perf_counter() - started)
                assert answer[:2] == wire[:2] and answer[3] & 0x0F == 0, answer
        return times

    parts = [wires[i::clients] for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for part in pool.map(one_client, parts) for t in part]
    return time.perf_counter() - started, times


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    ready: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve_dns, args=(ready,), daemon=True)
    server.start()
    upstream = ready.get(timeout=10)
    port = free_port()
    forwarder = subprocess.Popen([sys.executable, "-c", FORWARDER, str(port), str(upstream)],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        time.sleep(1.5)
        ask_all(port, 1000, args.clients)  # warm both
        ask_all(upstream, 1000, args.clients)
        rows = []
        for label, target, pid in (("DNS server asked directly", upstream, None),
                                   ("through the forwarder", port, forwarder.pid)):
            cpu_before = cpu_seconds(pid) if pid else 0.0
            elapsed, times = ask_all(target, args.queries, args.clients)
            cpu = (cpu_seconds(pid) - cpu_before) if pid else 0.0
            times.sort()
            rows.append((label, args.queries / elapsed, statistics.median(times) * 1000,
                         times[int(len(times) * 0.99)] * 1000, cpu * 1e6 / args.queries,
                         rss_kib(pid) if pid else 0))
    finally:
        forwarder.terminate()
        server.kill()
    print(f"{args.queries} A queries, {NAMES} names, {args.clients} clients, "
          f"{os.cpu_count()} cores")
    print(f"{'':28} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/q':>9} {'RSS KiB':>8}")
    for label, rate, p50, p99, cpu_us, rss in rows:
        print(f"{label:28} {rate:10.0f} {p50:8.3f} {p99:8.3f} {cpu_us or 0:9.0f} {rss or '-':>8}")
    direct, forwarded = rows
    print(f"\nforwarder: {forwarded[1] / direct[1]:.2f}x the direct rate; "
          f"+{forwarded[2] - direct[2]:.3f} ms at p50, +{forwarded[3] - direct[3]:.3f} ms at p99 "
          "a lookup")


if __name__ == "__main__":
    main()
