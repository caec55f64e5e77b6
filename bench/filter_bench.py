"""Content-filter benchmark: what the ClamAV and SpamAssassin filters cost, next to plain
Postfix and next to spamd alone, in the same run.

  1. smtp-source -> Postfix -> smtp-sink                          (no filter: the peer)
  2. smtp-source -> Postfix -> clamav -> spamd -> Postfix:10027 -> smtp-sink,
     scanners replaced by always-clean stand-ins (the relay's own cost)
  3. the same chain with the real clamd and spamd (-L, local tests only)
  4. spamd alone over SPAMC with as many clients as it has children (3 and 4 alternate,
     `--rounds` times; medians)
  5. one filter hop alone, smtp-source -> clamav filter (stand-in clamd) -> smtp-sink:
     msg/s, and the median latency it adds to one SMTP transaction

    .venv/bin/python bench/filter_bench.py [--messages 2000] [--sessions 20] [--size 2048]
                                           [--scanned 300] [--rounds 3]

Needs root (Postfix), Debian's postfix, clamav-daemon and spamd (scripts/install-deps.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from secumail.protocols import spamc  # noqa: E402
from services.postfix.render import scan_transport  # noqa: E402
from tests.support import mail  # noqa: E402
from tests.support.postfix import PostfixInstance  # noqa: E402
from tests.support.processes import (  # noqa: E402
    Daemon,
    free_port,
    service_env,
    start_service,
    wait_for_port,
)
from tests.support.scanners import Clamd, Spamd  # noqa: E402

SPAMD_CHILDREN = 2
SCANNER_SETTING = {"clamav": "clamd_address", "spamd": "spamassassin_address"}


def stand_in_scanners() -> tuple[Daemon, int, int]:
    """Always-clean clamd and spamd stand-ins (bench only): the relay's cost, no scanning."""
    clamd_port, spamd_port = free_port(), free_port()
    daemon = Daemon([sys.executable, str(Path(__file__).parent / "stand_in_scanners.py"),
                     str(clamd_port), str(spamd_port)], name="stand-in-scanners")
    wait_for_port(clamd_port)
    wait_for_port(spamd_port)
    return daemon, clamd_port, spamd_port


def smtp_sink() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    sink = subprocess.Popen(
        [shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", "-u", "postfix", "-c",
         f"127.0.0.1:{port}", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return sink, port


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """Send `messages` of `size` bytes over `sessions` connections; seconds it took."""
    started = time.perf_counter()
    subprocess.run(
        [shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-s", str(sessions),
         "-m", str(messages), "-l", str(size), "-f", "bench@secumail.test",
         "-t", "sink@secumail.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def bench_message(size: int) -> bytes:
    """A plain message of about `size` bytes: the same one for the chain and spamd alone."""
    return mail.plain(body=("x" * 76 + "\n") * (size // 77))


def send_messages(port: int, messages: int, sessions: int, size: int) -> float:
    """Like smtp-source, but with `bench_message`: `sessions` threads share the work."""
    body = bench_message(size)
    todo = iter(range(messages))

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            for _ in todo:
                smtp.sendmail("bench@secumail.test", ["sink@secumail.test"], body)

    started = time.perf_counter()
    threads = [threading.Thread(target=session) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def drained(postfix: PostfixInstance, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while postfix.queue_ids():
        if time.monotonic() > deadline:
            raise RuntimeError("Postfix's queue did not drain:\n" + postfix.log()[-2000:])
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, of its children alive, and of those it has reaped (/proc):
    spamd's and Postfix's children come and go during a run."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue  # it ended meanwhile; its parent reaps it into its own count
        fields = stat[stat.rfind(")") + 2 :].split()
        if entry.name == str(pid):
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        elif fields and fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def through_postfix(sink_port: int, messages: int, sessions: int, size: int,
                    filter_port: int | None = None, reinjection: int | None = None,
                    send: Callable[[int, int, int, int], float] = smtp_source,
                    watch: dict[str, int] | None = None) -> tuple[float, dict[str, float]]:
    """msg/s from smtp-source until Postfix's queue is empty again, and the CPU
    milliseconds per message of Postfix and of the `watch`ed processes (name: pid)."""
    main = {
        "relay_domains": "secumail.test",
        "transport_maps": f"inline:{{ secumail.test=smtp:[127.0.0.1]:{sink_port} }}",
        "default_process_limit": "200",
    }
    extra = ""
    if filter_port is not None:
        main["content_filter"] = f"scan:[127.0.0.1]:{filter_port}"
        main["receive_override_options"] = "no_address_mappings"
        extra = "\n".join(scan_transport(20)) + "\n" + (  # the production transport
            f"127.0.0.1:{reinjection} inet n - n - 100 smtpd\n  -o content_filter=\n"
            "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks\n"
            "  -o smtpd_recipient_restrictions=permit_mynetworks,reject\n"
            "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8\n"
        )
    postfix = PostfixInstance(main, extra).start()
    try:
        pids = {**(watch or {}),
                "postfix": int((postfix.root / "queue/pid/master.pid").read_text())}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        send(postfix.port, messages, sessions, size)
        drained(postfix)
        rate = messages / (time.perf_counter() - started)
        return rate, {name: (cpu_seconds(pid) - before[name]) * 1000 / messages
                      for name, pid in pids.items()}
    finally:
        postfix.stop()


def start_filter(name: str, scanner: str, next_hop: int) -> tuple[Daemon, int]:
    """secumail-clamav or secumail-spamd on a free port, handing mail to `next_hop`."""
    port = free_port()
    daemon = start_service(f"secumail-{name}", service_env(**{
        f"{name}_listen": f"127.0.0.1:{port}", f"{name}_next_hop": f"127.0.0.1:{next_hop}",
        SCANNER_SETTING[name]: scanner,
        "log_level": "WARNING",
    }), f"SECUMAIL_{name.upper()}_LISTEN")
    return daemon, port


def start_chain(clamd: str, spamd: str, next_hop: int) -> tuple[list[Daemon], int]:
    spamd_filter, spamd_port = start_filter("spamd", spamd, next_hop)
    clamav_filter, clamav_port = start_filter("clamav", clamd, spamd_port)
    return [clamav_filter, spamd_filter], clamav_port


def transaction_latency(port: int, count: int, size: int) -> float:
    """Median seconds of one whole SMTP transaction (connection reused), for `count` sends."""
    body = bench_message(size)
    times = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("bench.secumail.test")
        for _ in range(count):
            started = time.perf_counter()
            smtp.sendmail("bench@secumail.test", ["sink@secumail.test"], body)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def spamd_alone(address: str, messages: int, clients: int, size: int) -> float:
    body = bench_message(size)
    todo = iter(range(messages))

    async def client() -> None:
        for _ in todo:
            await spamc.check(address, body, 60)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return messages / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--scanned", type=int, default=300, help="messages for real scanners")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated rounds of the real chain and of spamd alone")
    args = parser.parse_args()
    if os.getuid() != 0:
        raise SystemExit("run as root: the benchmark starts its own Postfix instances")
    tempfile.tempdir = tempfile.mkdtemp(prefix="secumail-filter-bench-")
    os.chmod(tempfile.tempdir, 0o755)  # Postfix's own user must reach its queue in there
    sink, sink_port = smtp_sink()
    stand_ins, clamd_port, spamd_port = stand_in_scanners()
    clamd, spamd = Clamd().start(), Spamd().start()
    rows: list[tuple[str, str]] = []
    daemons: list[Daemon] = []
    try:
        plain, _ = through_postfix(sink_port, args.messages, args.sessions, args.size)
        rows.append(("postfix -> smtp-sink (no filter)", f"{plain:8.0f} msg/s"))

        reinjection = free_port()
        chain, chain_port = start_chain(
            f"127.0.0.1:{clamd_port}", f"127.0.0.1:{spamd_port}", reinjection
        )
        daemons += chain
        noop, _ = through_postfix(sink_port, args.messages, args.sessions, args.size,
                               chain_port, reinjection)
        rows.append(("postfix -> 2 filters (no-op scan) -> postfix", f"{noop:8.0f} msg/s"))
        rows.append(("  ratio to no filter", f"{noop / plain:8.2f}x"))

        reinjection = free_port()
        real, real_port = start_chain(clamd.address, spamd.address, reinjection)
        daemons += real
        assert spamd.daemon and clamd.daemon
        watch = {"spamd": spamd.daemon.proc.pid, "clamd": clamd.daemon.proc.pid,
                 "clamav filter": real[0].proc.pid, "spamd filter": real[1].proc.pid}
        # Chain and spamd alone in alternated rounds, medians: the machine's speed drifts
        # (once 0.64x and 0.92x in two runs of one round each), a pair of rounds less so.
        chain_rates, alone_rates, ratios = [], [], []
        cpu_rounds: list[dict[str, float]] = []
        alone_cpu: list[float] = []
        for _ in range(args.rounds):
            scanned, cpu = through_postfix(
                sink_port, args.scanned, SPAMD_CHILDREN * 4, args.size, real_port, reinjection,
                send=send_messages, watch=watch,
            )
            spamd_before = cpu_seconds(spamd.daemon.proc.pid)
            alone = asyncio.run(
                spamd_alone(spamd.address, args.scanned, SPAMD_CHILDREN, args.size)
            )
            alone_cpu.append(
                (cpu_seconds(spamd.daemon.proc.pid) - spamd_before) * 1000 / args.scanned
            )
            chain_rates.append(scanned)
            alone_rates.append(alone)
            ratios.append(scanned / alone)
            cpu_rounds.append(cpu)
        median = statistics.median
        rows.append(("postfix -> clamd + spamd filters -> postfix",
                     f"{median(chain_rates):8.1f} msg/s  (rounds: "
                     + ", ".join(f"{r:.1f}" for r in chain_rates) + ")"))
        rows.append(("  CPU ms per message", "  " + ", ".join(
            f"{name} {median(c[name] for c in cpu_rounds):.1f}" for name in cpu_rounds[0])))
        rows.append((f"spamd alone ({SPAMD_CHILDREN} children, SPAMC)",
                     f"{median(alone_rates):8.1f} msg/s  (rounds: "
                     + ", ".join(f"{r:.1f}" for r in alone_rates) + ")"))
        rows.append(("  CPU ms per message", f"  spamd {median(alone_cpu):.0f}"))
        rows.append(("  ratio chain / spamd alone", f"{median(ratios):8.2f}x  (rounds: "
                     + ", ".join(f"{r:.2f}" for r in ratios) + ")"))

        # One hop: smtp-source -> clamav filter (stand-in clamd) -> smtp-sink.
        hop, hop_port = start_filter("clamav", f"127.0.0.1:{clamd_port}", sink_port)
        daemons.append(hop)
        started = time.perf_counter()
        smtp_source(hop_port, args.messages, args.sessions, args.size)
        # smtp-source ends when the last 250 came back: the filter answered after the sink.
        rate = args.messages / (time.perf_counter() - started)
        rows.append(("one filter hop alone (no-op scan)", f"{rate:8.0f} msg/s"))
        direct = transaction_latency(sink_port, 300, args.size)
        through = transaction_latency(hop_port, 300, args.size)
        rows.append(("  smtp-sink directly, p50 transaction", f"{direct * 1000:8.2f} ms"))
        rows.append(("  through one filter, p50 transaction", f"{through * 1000:8.2f} ms"))
        rows.append(("  added by the filter hop, p50", f"{(through - direct) * 1000:8.2f} ms"))
    finally:
        for daemon in daemons:
            daemon.stop()
        clamd.stop()
        spamd.stop()
        stand_ins.stop()
        sink.terminate()
    print(f"filter benchmark: {args.messages} messages of {args.size} bytes, "
          f"{args.sessions} sessions ({args.scanned} through the real scanners)")
    for name, value in rows:
        print(f"{name:<48}{value}")


if __name__ == "__main__":
    main()
