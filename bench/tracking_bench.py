"""Message tracking's cost (issue 18), tracking on against off in the same run: a filter hop
and the policy service, each with a collector asking its /events every 2 s as the gateway
does, and the gateway's store taking events.

  1. one filter hop: smtp-source -> clamav filter (stand-in clamd) -> smtp-sink, msg/s
  2. the policy service, plain greylisting (the policy benchmark's stream), requests/s
  3. the gateway's SQLite store: events stored per second, bytes per event on disk

Rounds alternated, medians. One after the other, the same service's rate here varies by up to
2x from one minute to the next (the host's other tenants), far more than the 5% to measure; so
both are also measured side by side (--side-by-side): tracking on and off running at once on
one core, each given half of it by the kernel, their clients, the collector (and for the
filter the sink and the stand-in clamd) on the other core. That ratio held within 2% (policy)
and 3% (filter) from round to round.

    sudo .venv/bin/python bench/tracking_bench.py [--messages 5000] [--requests 40000]
                                                  [--rounds 3] [--side-by-side 6] [--window 15]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filter_bench import cpu_seconds, smtp_sink, smtp_source, stand_in_scanners
from policy_bench import PLAIN, make_stream, measure, replay, start_secumail

from gateway.tracking import StoredEvent, TrackingStore
from secumail import tracking
from secumail.protocols.policy import encode_request
from testkit.processes import free_port, scrape, service_env, start_service

ROOT = Path(__file__).resolve().parents[1]

INTERVAL = 2.0  # SECUMAIL_TRACKING_INTERVAL's default


def collect_forever(metrics: str) -> None:
    """What the gateway's collector asks of one replica: every event, every 2 s, pages until
    it has the last event the replica had when it answered (gateway/tracking.py's rule).
    Until 2026-12-03 it asked again until a page came back empty: against a busy service
    it never did, and it asked without pause, some 200 times a second."""
    after, boot = 0, ""
    while True:
        while True:
            try:
                with urllib.request.urlopen(f"http://{metrics}/events?after={after}",
                                            timeout=5) as response:
                    answer = json.loads(response.read())
            except OSError:
                break
            if answer["boot"] != boot:
                boot, after = answer["boot"], 0
            if not answer["events"]:
                break
            after = answer["events"][-1][0]
            if after >= answer["last"]:  # caught up with this answer: the gateway waits too
                break
        time.sleep(INTERVAL)


def collector(metrics: str) -> multiprocessing.Process:
    process = multiprocessing.Process(target=collect_forever, args=(metrics,), daemon=True)
    process.start()
    return process


@dataclass
class Round:
    rate: float  # messages or requests per second
    cpu_us: float  # the service's CPU per message or request, microseconds
    collector_us: float  # the collector's (the gateway's part), per message or request


def measured(pid: int, watcher: multiprocessing.Process | None, count: int,
             run: Callable[[], float]) -> Round:
    """`run` (it returns the rate) with the service's and the collector's CPU counted."""
    before = cpu_seconds(pid)
    collector_before = cpu_seconds(watcher.pid) if watcher and watcher.pid else 0.0
    rate = run()
    time.sleep(INTERVAL + 0.5)  # the collector's last collection of this run
    collector = (cpu_seconds(watcher.pid) - collector_before) if watcher and watcher.pid else 0
    return Round(rate, (cpu_seconds(pid) - before) * 1e6 / count, collector * 1e6 / count)


def filter_round(clamd_port: int, sink_port: int, on: bool, messages: int) -> Round:
    hop, port = filter_hop(clamd_port, sink_port, on)
    watcher = collector(f"127.0.0.1:{hop.metrics_port}") if on else None
    try:
        smtp_source(port, 300, 20, 2048)  # warm up
        return measured(hop.proc.pid, watcher, messages,
                        lambda: messages / smtp_source(port, messages, 20, 2048))
    finally:
        if watcher is not None:
            watcher.terminate()
        hop.stop()


def policy_round(stream: list[bytes], on: bool) -> Round:
    workdir = Path(tempfile.mkdtemp(prefix="secumail-tracking-bench-"))
    metrics = f"127.0.0.1:{free_port()}"
    proc, port = start_secumail(workdir, {**PLAIN, "SECUMAIL_METRICS_LISTEN": metrics,
                                          "SECUMAIL_TRACKING": "true" if on else "false"})
    watcher = collector(metrics) if on else None
    try:
        return measured(proc.pid, watcher, len(stream) + 500,  # with measure()'s warm-up
                        lambda: measure("policy", port, proc.pid, stream, 20).rate)
    finally:
        if watcher is not None:
            watcher.terminate()
        proc.terminate()
        proc.wait(30)


SERVICE_CORE, CLIENT_CORE = 1, 0  # side by side: both services on one core, the rest on the other


def _timed_client(port: int, stream: list[bytes], start: Any, results: Any) -> None:
    """One service's client, in a process of its own: warm up, wait for the other's, replay."""
    os.sched_setaffinity(0, {CLIENT_CORE})
    asyncio.run(replay(port, stream[:500], 20))
    start.wait()
    answered: list[float] = []
    started = time.perf_counter()
    asyncio.run(replay(port, stream, 20, answered))
    results.put((port, started, answered))


@dataclass
class SideBySide:
    on: float  # requests per second over the seconds both services were answering
    off: float
    shares: tuple[float, float]  # the CPU each had then, in cores (on, off): 0.5 each if fair


def side_by_side_round(stream: list[bytes], on_first: bool) -> SideBySide:
    """Tracking on and off at the same time, so that the machine's drift (up to 2x from one
    minute to the next here, CPU time a request included) is the same for both: both
    services share one core, the kernel giving each half of it while both are busy, and
    their two clients and the collector run on the other core. The rates are counted over
    the seconds until the first client is done."""
    services: dict[bool, tuple[subprocess.Popen[bytes], int, str]] = {}
    for on in (True, False) if on_first else (False, True):
        workdir = Path(tempfile.mkdtemp(prefix="secumail-tracking-bench-"))
        metrics = f"127.0.0.1:{free_port()}"
        proc, port = start_secumail(workdir, {**PLAIN, "SECUMAIL_METRICS_LISTEN": metrics,
                                              "SECUMAIL_TRACKING": "true" if on else "false"})
        os.sched_setaffinity(proc.pid, {SERVICE_CORE})
        services[on] = (proc, port, metrics)
    watcher = collector(services[True][2])
    os.sched_setaffinity(watcher.pid or 0, {CLIENT_CORE})
    start = multiprocessing.Barrier(3)
    results: multiprocessing.Queue[tuple[int, float, list[float]]] = multiprocessing.Queue()
    clients = [multiprocessing.Process(target=_timed_client,
                                       args=(port, stream, start, results), daemon=True)
               for _, port, _ in services.values()]
    try:
        for client in clients:
            client.start()
        start.wait(timeout=120)
        cpu_before = {on: cpu_seconds(proc.pid) for on, (proc, _, _) in services.items()}
        window_start = time.perf_counter()
        first = results.get(timeout=600)  # the first client done: the window's end
        window = time.perf_counter() - window_start
        shares = {on: (cpu_seconds(proc.pid) - cpu_before[on]) / window
                  for on, (proc, _, _) in services.items()}
        answers = {port: (started, answered) for port, started, answered
                   in (first, results.get(timeout=600))}
    finally:
        watcher.terminate()
        for proc, _, _ in services.values():
            proc.terminate()
            proc.wait(30)
    begin = max(started for started, _ in answers.values())
    end = min(answered[-1] for _, answered in answers.values())
    rates = {on: (bisect.bisect_right(answers[port][1], end)
                  - bisect.bisect_left(answers[port][1], begin)) / (end - begin)
             for on, (_, port, _) in services.items()}
    return SideBySide(rates[True], rates[False], (shares[True], shares[False]))


def filter_hop(clamd_port: int, sink_port: int, on: bool) -> tuple[Any, int]:
    """One clamav filter hop to the sink, tracking on or off, with its metrics listener;
    and the port it listens on."""
    port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    return start_service("secumail-clamav", service_env(
        clamav_listen=f"127.0.0.1:{port}", clamav_next_hop=f"127.0.0.1:{sink_port}",
        clamd_address=f"127.0.0.1:{clamd_port}", log_level="WARNING", metrics_listen=metrics,
        tracking="true" if on else "false"), "SECUMAIL_CLAMAV_LISTEN"), port


def messages_relayed(metrics_port: int) -> float:
    """secumail_filter_messages_total, every verdict: the hop's messages so far."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in scrape(metrics_port).splitlines()
               if line.startswith("secumail_filter_messages_total{"))


def filter_side_by_side_round(clamd_port: int, sink_port: int, on_first: bool,
                              seconds: float) -> SideBySide:
    """The filter hop as side_by_side_round measures the policy service: both hops on one
    core, their smtp-sources, the sink, the stand-in clamd and the collector on the other.
    The rates are each hop's messages counted (its metrics) over `seconds` while both
    sources are sending, from 3 s after they started."""
    started_hops = {on: filter_hop(clamd_port, sink_port, on)
                    for on in ((True, False) if on_first else (False, True))}
    hops = {on: hop for on, (hop, _) in started_hops.items()}
    for hop in hops.values():
        os.sched_setaffinity(hop.proc.pid, {SERVICE_CORE})
    watcher = collector(f"127.0.0.1:{hops[True].metrics_port}")
    os.sched_setaffinity(watcher.pid or 0, {CLIENT_CORE})
    sources = []
    try:
        for _, port in started_hops.values():
            smtp_source(port, 300, 20, 2048)  # warm up
        for _, port in started_hops.values():
            sources.append(subprocess.Popen(
                ["taskset", "-c", str(CLIENT_CORE), "smtp-source", "-s", "20", "-m", "10000000",
                 "-l", "2048", "-f", "bench@secumail.test", "-t", "sink@secumail.test",
                 f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL))
        time.sleep(3)
        before = {on: (messages_relayed(hop.metrics_port), cpu_seconds(hop.proc.pid))
                  for on, hop in hops.items()}
        started = time.perf_counter()
        time.sleep(seconds)
        after = {on: (messages_relayed(hop.metrics_port), cpu_seconds(hop.proc.pid))
                 for on, hop in hops.items()}
        window = time.perf_counter() - started
        if any(source.poll() is not None for source in sources):
            raise RuntimeError("an smtp-source ended before the window did")
    finally:
        for source in sources:
            source.kill()
            source.wait()
        watcher.terminate()
        for hop in hops.values():
            hop.stop()
    rates = {on: (after[on][0] - before[on][0]) / window for on in hops}
    shares = {on: (after[on][1] - before[on][1]) / window for on in hops}
    return SideBySide(rates[True], rates[False], (shares[True], shares[False]))


def store_rate(count: int) -> tuple[float, float]:
    """Events stored per second in pages of 1,000 (one collection), and bytes per event."""
    path = Path(tempfile.mkdtemp(prefix="secumail-tracking-store-")) / "tracking.db"
    store = TrackingStore(str(path), retention=86400, max_events=10 * count)
    events = [StoredEvent(tracking.event(
        "clamav", "passed", "clean; 250 2.0.0 Ok: queued as 4F2A21C0A5B",
        client=f"203.0.113.{n % 250}", sender=f"sender{n}@remote.example",
        recipients=(f"user{n % 100}@example.org",), next_queue_id=f"4F2A{n:07X}",
        message_id=f"{n}.abcdef@remote.example"), "secumail-clamav-1") for n in range(count)]
    started = time.perf_counter()
    for page in range(0, count, 1000):
        store.add("bench", page + 1000, events[page:page + 1000])
    rate = count / (time.perf_counter() - started)
    store.close()
    size = sum(f.stat().st_size for f in path.parent.iterdir())
    return rate, size / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=3, help="one after the other (0: none)")
    parser.add_argument("--side-by-side", type=int, default=6, metavar="ROUNDS",
                        help="each service on and off at once (0: none)")
    parser.add_argument("--window", type=float, default=15.0,
                        help="seconds a side-by-side round of the filter hop counts")
    args = parser.parse_args()
    if os.getuid() != 0:
        raise SystemExit("run as root: smtp-sink runs as the postfix user")
    sink, sink_port = smtp_sink()
    stand_ins, clamd_port, _ = stand_in_scanners()
    stream = [encode_request(r) for r in make_stream(args.requests)]
    rounds: dict[str, list[Round]] = {name: [] for name in
                                      ("filter on", "filter off", "policy on", "policy off")}
    try:
        for number in range(args.rounds):
            # On first in even rounds, off first in odd ones: the machine's drift within a
            # round (10-20% here) then favours neither.
            for tracking_on in ((True, False) if number % 2 == 0 else (False, True)):
                state = "on" if tracking_on else "off"
                rounds[f"filter {state}"].append(
                    filter_round(clamd_port, sink_port, tracking_on, args.messages))
                rounds[f"policy {state}"].append(policy_round(stream, tracking_on))
        for pid in (sink.pid, stand_ins.proc.pid):
            os.sched_setaffinity(pid, {CLIENT_CORE})
        filter_side_by_side = [filter_side_by_side_round(clamd_port, sink_port, n % 2 == 0,
                                                         args.window)
                               for n in range(args.side_by_side)]
    finally:
        stand_ins.stop()
        sink.terminate()
    side_by_side = [side_by_side_round(stream, n % 2 == 0) for n in range(args.side_by_side)]
    stored, size = store_rate(100_000)
    median = statistics.median
    print(f"tracking benchmark: {args.messages} messages of 2 KB over 20 sessions, "
          f"{args.requests} policy requests over 20 connections, median of {args.rounds} rounds")
    for what, unit in (("filter", "msg/s"), ("policy", "req/s")) if args.rounds else ():
        on, off = rounds[f"{what} on"], rounds[f"{what} off"]
        label = "one filter hop" if what == "filter" else "policy service"
        for state, found in (("on", on), ("off", off)):
            print(f"{label + ', tracking ' + state:<36}{median(r.rate for r in found):>9.0f} "
                  f"{unit}  CPU {median(r.cpu_us for r in found):6.1f} us each"
                  + (f", collector {median(r.collector_us for r in found):.1f} us"
                     if state == "on" else ""))
        rate = median(r.rate for r in on) / median(r.rate for r in off)
        cpu = median(r.cpu_us for r in on) / median(r.cpu_us for r in off)
        # Each round's on and off ran back to back: their ratio is what the machine's drift
        # from one minute to the next (10-20% here) least disturbs.
        paired = median(a.rate / b.rate for a, b in zip(on, off, strict=True))
        paired_cpu = median(a.cpu_us / b.cpu_us for a, b in zip(on, off, strict=True))
        print(f"{'  ratio on/off, paired by round':<36}{paired:>9.3f}x {unit}, "
              f"{paired_cpu:.3f}x CPU (medians of each round's ratio)")
        print(f"{'  ratio on/off':<36}{rate:>9.3f}x {unit}, {cpu:.3f}x CPU  (rounds on/off: "
              + ", ".join(f"{a.rate:.0f}/{b.rate:.0f}" for a, b in zip(on, off, strict=True))
              + "; CPU us: " + ", ".join(f"{a.cpu_us:.0f}/{b.cpu_us:.0f}"
                                        for a, b in zip(on, off, strict=True)) + ")")
    for label, unit, pairs in (("one filter hop", "msg/s", filter_side_by_side),
                               ("policy service", "req/s", side_by_side)):
        if not pairs:
            continue
        print(f"{label}, tracking on and off at once on one core, {len(pairs)} rounds "
              "(on/off, each the median of each round's):")
        print(f"{'  ' + unit + ' on, off':<36}{median(r.on for r in pairs):>9.0f} "
              f"{median(r.off for r in pairs):.0f} {unit}  ratio "
              f"{median(r.on / r.off for r in pairs):.3f}x  (rounds: "
              + ", ".join(f"{r.on / r.off:.3f}" for r in pairs) + ")")
        print(f"{'  CPU each had, in cores':<36}" + ", ".join(
            f"{r.shares[0]:.2f}/{r.shares[1]:.2f}" for r in pairs))
    print(f"{'gateway store, events stored':<36}{stored:>9.0f} events/s  "
          f"({size:.0f} bytes per event on disk)")


if __name__ == "__main__":
    main()
