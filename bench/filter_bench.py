"""Content-filter benchmark: what the ClamAV and SpamAssassin filters cost in both filter
modes, next to plain Postfix, spamd alone and amavisd-new, in the same run.

  1. smtp-source -> Postfix -> smtp-sink                          (no filter: the peer)
  2. smtp-source -> Postfix -> clamav -> spamd -> Postfix:10027 -> smtp-sink, scanners
     replaced by always-clean stand-ins (the relay's own cost), after-queue (content_filter:
     two queue passes) and before-queue (smtpd_proxy_filter: one)
  3. the same chain with the real clamd and spamd (-L, local tests only), both modes, and
     spamd alone over SPAMC with as many clients as it has children, and amavisd-new
     (Debian's, SpamAssassin in its own 2 children, the same clamd) as Postfix's
     content_filter: alternated `--rounds` times, medians, CPU per message of each
  4. what a client waits for one message in before-queue mode (p50, p99), against Postfix
     alone, one session sending one message after the other
  5. one filter hop alone, smtp-source -> clamav filter (stand-in clamd) -> smtp-sink:
     msg/s, and the median latency it adds to one SMTP transaction

    .venv/bin/python bench/filter_bench.py [--messages 2000] [--sessions 20] [--size 2048]
                                           [--scanned 300] [--rounds 3]
    .venv/bin/python bench/filter_bench.py --hop-only [--against REV] [--rounds 3]

`--hop-only` runs step 5 alone, with the filter's CPU per message; `--against REV` runs the
same hop with the code of an earlier commit (a git worktree of it, first on PYTHONPATH) in
alternated rounds: a change to what every message crosses, measured beside what it replaces.

Needs root (Postfix), Debian's postfix, clamav-daemon and spamd (scripts/install-deps.sh),
and amavisd-new for the peer (apt-get install amavisd-new; skipped, saying so, without it).
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

from secumail.protocols import spamc
from testkit import mail
from testkit.postfix import (
    PostfixInstance,
    filtering_postfix,
    sink_transport,
)
from testkit.processes import (
    Daemon,
    free_port,
    service_env,
    start_service,
    wait_for_port,
)
from testkit.scanners import Clamd, Spamd

ROOT = Path(__file__).resolve().parents[1]

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
                    mode: str = "after-queue",
                    send: Callable[[int, int, int, int], float] = smtp_source,
                    watch: dict[str, int] | None = None,
                    amavis: int | None = None) -> tuple[float, dict[str, float]]:
    """msg/s from smtp-source until Postfix's queue is empty again, and the CPU
    milliseconds per message of Postfix and of the `watch`ed processes (name: pid). With a
    `filter_port`: SecuMail's chain in `mode`, configured as production renders it; with
    `amavis`: amavisd-new as content_filter, its mail back on `reinjection`."""
    if filter_port is not None:
        assert reinjection is not None
        postfix = filtering_postfix(mode, filter_port, reinjection, sink_port, processes=100,
                                    default_process_limit="200")
    else:
        main = {**sink_transport(sink_port), "default_process_limit": "200"}
        extra = ""
        if amavis is not None:  # amavisd-new's README.postfix, on loopback
            main["content_filter"] = f"amavis:[127.0.0.1]:{amavis}"
            main["receive_override_options"] = "no_address_mappings"
            extra = (
                f"amavis unix - - n - {AMAVIS_CHILDREN} smtp\n"
                "  -o smtp_data_done_timeout=1200\n  -o smtp_send_xforward_command=yes\n"
                f"127.0.0.1:{reinjection} inet n - n - 100 smtpd\n  -o content_filter=\n"
                "  -o receive_override_options=no_unknown_recipient_checks,"
                "no_header_body_checks,no_milters\n"
                "  -o smtpd_recipient_restrictions=permit_mynetworks,reject\n"
                "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8\n")
        postfix = PostfixInstance(main, extra)
    postfix.start()
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


def start_filter(name: str, scanner: str, next_hop: int, mode: str = "after-queue",
                 code: Path | None = None) -> tuple[Daemon, int]:
    """secumail-clamav or secumail-spamd on a free port, handing mail to `next_hop`; the
    code of the checkout at `code` when given."""
    port = free_port()
    env = service_env(**{
        f"{name}_listen": f"127.0.0.1:{port}", f"{name}_next_hop": f"127.0.0.1:{next_hop}",
        SCANNER_SETTING[name]: scanner, "filter_mode": mode, "log_level": "WARNING",
    })
    if code is not None:
        env["PYTHONPATH"] = str(code)  # ahead of the editable install's finder
    daemon = start_service(f"secumail-{name}", env, f"SECUMAIL_{name.upper()}_LISTEN")
    return daemon, port


def hop_figures(clamd_port: int, sink_port: int, args: argparse.Namespace,
                code: Path | None = None) -> tuple[float, float, float]:
    """One filter hop alone: msg/s over `args.sessions`, ms added to one transaction at p50
    (one session), the filter's CPU in us per message."""
    hop, hop_port = start_filter("clamav", f"127.0.0.1:{clamd_port}", sink_port, code=code)
    try:
        cpu_before = cpu_seconds(hop.proc.pid)
        started = time.perf_counter()
        smtp_source(hop_port, args.messages, args.sessions, args.size)
        # smtp-source ends when the last 250 came back: the filter answered after the sink.
        rate = args.messages / (time.perf_counter() - started)
        cpu = (cpu_seconds(hop.proc.pid) - cpu_before) * 1e6 / args.messages
        direct = statistics.median(transaction_times(sink_port, 300, args.size))
        through = statistics.median(transaction_times(hop_port, 300, args.size))
    finally:
        hop.stop()
    return rate, (through - direct) * 1000, cpu


def hop_only(args: argparse.Namespace) -> None:
    sink, sink_port = smtp_sink()
    stand_ins, clamd_port, _ = stand_in_scanners()
    codes: dict[str, Path | None] = {"this tree": None}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="filter-bench-against-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree),
                        args.against], check=True, capture_output=True)
        codes[args.against] = worktree
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in codes}
    try:
        for _ in range(args.rounds):
            for name, code in codes.items():
                figures[name].append(hop_figures(clamd_port, sink_port, args, code))
    finally:
        stand_ins.stop()
        sink.terminate()
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=False)
    print(f"one filter hop alone: {args.messages} messages of {args.size} bytes, "
          f"{args.sessions} sessions, stand-in clamd, {args.rounds} alternated rounds")
    for name, rounds in figures.items():
        rates, added, cpu = zip(*rounds, strict=True)
        print(f"{name:<14} {statistics.median(rates):8.0f} msg/s  "
              f"p50 added {statistics.median(added):5.2f} ms  "
              f"filter CPU {statistics.median(cpu):6.0f} us/msg  (rounds: "
              + ", ".join(f"{r:.0f}" for r in rates) + ")")
    if args.against:
        this, other = (statistics.median(r for r, _, _ in figures[n]) for n in codes)
        print(f"this tree / {args.against}: {this / other:.2f}x")


def start_chain(clamd: str, spamd: str, next_hop: int, mode: str
                ) -> tuple[list[Daemon], int]:
    spamd_filter, spamd_port = start_filter("spamd", spamd, next_hop, mode)
    clamav_filter, clamav_port = start_filter("clamav", clamd, spamd_port, mode)
    return [clamav_filter, spamd_filter], clamav_port


def transaction_times(port: int, count: int, size: int) -> list[float]:
    """Seconds of each whole SMTP transaction of one session sending `count` messages."""
    body = bench_message(size)
    times = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("bench.secumail.test")
        for _ in range(count):
            started = time.perf_counter()
            smtp.sendmail("bench@secumail.test", ["sink@secumail.test"], body)
            times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --- amavisd-new, the peer ------------------------------------------------------------------

AMAVIS_CHILDREN = 2  # as many SpamAssassin processes as spamd has children
AMAVIS_CONFIG = """
use strict;
$MYHOME = '{home}';
$TEMPBASE = "$MYHOME/tmp";
$ENV{{TMPDIR}} = $TEMPBASE;
$db_home = "$MYHOME/db";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$daemon_user = 'amavis';
$daemon_group = 'amavis';
$mydomain = 'secumail.test';
$myhostname = 'mx.secumail.test';
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = {port};
@inet_acl = qw(127.0.0.1);
$forward_method = 'smtp:[127.0.0.1]:{reinjection}';
$notify_method = $forward_method;
$max_servers = {children};
$max_requests = 10000;
$child_timeout = 1200;
$sa_local_tests_only = 1;
$sa_tag_level_deflt = -999;
$sa_tag2_level_deflt = 5.0;
$sa_kill_level_deflt = 10.0;
$final_spam_destiny = D_DISCARD;
$final_virus_destiny = D_DISCARD;
@local_domains_maps = ( [".secumail.test"] );
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
$do_syslog = 0;
$LOGFILE = "$MYHOME/amavisd.log";
$log_level = 0;
@av_scanners = (['ClamAV-clamd', \\&ask_daemon, ["CONTSCAN {{}}\\n", "{clamd}"],
  qr/\\bOK$/m, qr/\\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ]);
@av_scanners_backup = ();
1;
"""


def start_amavis(clamd: str, reinjection: int) -> tuple[Daemon, int] | None:
    """amavisd-new in the foreground with its own home; None when it is not installed."""
    binary = shutil.which("amavisd") or "/usr/sbin/amavisd"
    if not Path(binary).exists():
        return None
    home = Path(tempfile.mkdtemp(prefix="amavis-bench-"))
    for folder in ("tmp", "db", "var"):
        (home / folder).mkdir()
    shutil.chown(home, "amavis", "amavis")
    for path in home.iterdir():
        shutil.chown(path, "amavis", "amavis")
    os.chmod(home, 0o755)
    port = free_port()
    # amavisd refuses a configuration in a folder its own user may write to.
    config_dir = Path(tempfile.mkdtemp(prefix="amavis-config-"))
    os.chmod(config_dir, 0o755)
    config = config_dir / "amavisd.conf"
    config.write_text(AMAVIS_CONFIG.format(home=home, port=port, reinjection=reinjection,
                                           children=AMAVIS_CHILDREN, clamd=clamd))
    daemon = Daemon([binary, "-c", str(config), "foreground"], name="amavisd")
    wait_for_port(port, timeout=120)
    return daemon, port


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
                        help="alternated rounds of the real chains, spamd alone, amavisd-new")
    parser.add_argument("--hop-only", action="store_true", help="step 5 alone")
    parser.add_argument("--against", help="with --hop-only: an earlier commit, beside")
    args = parser.parse_args()
    if os.getuid() != 0:
        raise SystemExit("run as root: the benchmark starts its own Postfix instances")
    tempfile.tempdir = tempfile.mkdtemp(prefix="secumail-filter-bench-")
    os.chmod(tempfile.tempdir, 0o755)  # Postfix's own user must reach its queue in there
    if args.hop_only:
        hop_only(args)
        return
    sink, sink_port = smtp_sink()
    stand_ins, clamd_port, spamd_port = stand_in_scanners()
    clamd, spamd = Clamd().start(), Spamd().start()
    rows: list[tuple[str, str]] = []
    daemons: list[Daemon] = []
    median = statistics.median
    modes = ("after-queue", "before-queue")
    try:
        noop_ports: dict[str, tuple[int, int]] = {}
        for mode in modes:
            reinjection = free_port()
            chain, chain_port = start_chain(
                f"127.0.0.1:{clamd_port}", f"127.0.0.1:{spamd_port}", reinjection, mode)
            daemons += chain
            noop_ports[mode] = (chain_port, reinjection)
        # Postfix alone and the no-op chains in alternated rounds too: a run of Postfix
        # alone varies by 20% from one minute to the next here.
        noop: dict[str, list[float]] = {"postfix": [], **{mode: [] for mode in modes}}
        for _ in range(args.rounds):
            noop["postfix"].append(
                through_postfix(sink_port, args.messages, args.sessions, args.size)[0])
            for mode in modes:
                noop[mode].append(through_postfix(
                    sink_port, args.messages, args.sessions, args.size, *noop_ports[mode],
                    mode)[0])
        plain = median(noop["postfix"])
        rows.append(("postfix -> smtp-sink (no filter)", f"{plain:8.0f} msg/s  (rounds: "
                     + ", ".join(f"{r:.0f}" for r in noop["postfix"]) + ")"))
        for mode in modes:
            rows.append((f"{mode}: postfix -> 2 filters (no-op scan)",
                         f"{median(noop[mode]):8.0f} msg/s  (rounds: "
                         + ", ".join(f"{r:.0f}" for r in noop[mode]) + ")"))
            rows.append(("  ratio to no filter", f"{median(noop[mode]) / plain:8.2f}x  (rounds: "
                         + ", ".join(f"{r / p:.2f}" for r, p in zip(noop[mode], noop["postfix"],
                                                                   strict=True)) + ")"))

        # What a client waits for in before-queue mode: the whole transaction, one message
        # after the other, against Postfix taking it into its queue alone.
        alone_times = client_times(sink_port, args.scanned, args.size)
        proxied_times = client_times(sink_port, args.scanned, args.size,
                                     *noop_ports["before-queue"])
        for share, name in ((0.5, "p50"), (0.99, "p99")):
            alone_t, proxied_t = percentile(alone_times, share), percentile(proxied_times, share)
            rows.append((f"before-queue: a client's transaction, {name}",
                         f"{proxied_t * 1000:8.2f} ms  (Postfix alone {alone_t * 1000:.2f} ms,"
                         f" added {(proxied_t - alone_t) * 1000:.2f} ms)"))

        assert spamd.daemon and clamd.daemon
        real: dict[str, tuple[int, int, dict[str, int]]] = {}
        for mode in modes:
            reinjection = free_port()
            filters, port = start_chain(clamd.address, spamd.address, reinjection, mode)
            daemons += filters
            real[mode] = (port, reinjection, {
                "spamd": spamd.daemon.proc.pid, "clamd": clamd.daemon.proc.pid,
                "clamav filter": filters[0].proc.pid, "spamd filter": filters[1].proc.pid})
        amavis_reinjection = free_port()
        amavis = start_amavis(clamd.address, amavis_reinjection)
        if amavis is not None:
            daemons.append(amavis[0])
        # Rounds alternated, medians: the machine's speed drifts (once 0.64x and 0.92x in
        # two runs of one round each), a set of rounds run side by side less so.
        rates: dict[str, list[float]] = {name: [] for name in (*modes, "spamd", "amavisd")}
        cpu: dict[str, list[dict[str, float]]] = {name: [] for name in rates}
        for _ in range(args.rounds):
            for mode in modes:
                port, reinjection, watch = real[mode]
                rate, used = through_postfix(
                    sink_port, args.scanned, SPAMD_CHILDREN * 4, args.size, port,
                    reinjection, mode, send=send_messages, watch=watch)
                rates[mode].append(rate)
                cpu[mode].append(used)
            spamd_before = cpu_seconds(spamd.daemon.proc.pid)
            rates["spamd"].append(asyncio.run(
                spamd_alone(spamd.address, args.scanned, SPAMD_CHILDREN, args.size)))
            cpu["spamd"].append({"spamd": (cpu_seconds(spamd.daemon.proc.pid) - spamd_before)
                                 * 1000 / args.scanned})
            if amavis is not None:
                rate, used = through_postfix(
                    sink_port, args.scanned, SPAMD_CHILDREN * 4, args.size,
                    reinjection=amavis_reinjection, send=send_messages, amavis=amavis[1],
                    watch={"amavisd": amavis[0].proc.pid, "clamd": clamd.daemon.proc.pid})
                rates["amavisd"].append(rate)
                cpu["amavisd"].append(used)

        def figures(name: str) -> str:
            return (f"{median(rates[name]):8.1f} msg/s  (rounds: "
                    + ", ".join(f"{r:.1f}" for r in rates[name]) + ")")

        def cpu_line(name: str) -> str:
            total = median(sum(c.values()) for c in cpu[name])
            return "  " + ", ".join(f"{part} {median(c[part] for c in cpu[name]):.1f}"
                                    for part in cpu[name][0]) + f"; all {total:.1f}"

        alone = median(rates["spamd"])
        rows.append((f"spamd alone ({SPAMD_CHILDREN} children, SPAMC)", figures("spamd")))
        rows.append(("  CPU ms per message", cpu_line("spamd")))
        for mode in modes:
            rows.append((f"{mode}: postfix -> clamd + spamd filters", figures(mode)))
            rows.append(("  CPU ms per message", cpu_line(mode)))
            rows.append(("  ratio to spamd alone", f"{median(rates[mode]) / alone:8.2f}x"))
        if amavis is None:
            rows.append(("amavisd-new", "not installed: apt-get install amavisd-new"))
        else:
            peer = median(rates["amavisd"])
            rows.append((f"amavisd-new ({AMAVIS_CHILDREN} children, same clamd)",
                         figures("amavisd")))
            rows.append(("  CPU ms per message", cpu_line("amavisd")))
            for mode in modes:
                rows.append((f"  {mode} SecuMail / amavisd-new",
                             f"{median(rates[mode]) / peer:8.2f}x"))

        # One hop: smtp-source -> clamav filter (stand-in clamd) -> smtp-sink.
        rate, added, cpu = hop_figures(clamd_port, sink_port, args)
        rows.append(("one filter hop alone (no-op scan)", f"{rate:8.0f} msg/s"))
        rows.append(("  added by the filter hop, p50", f"{added:8.2f} ms"))
        rows.append(("  filter CPU per message", f"{cpu:8.0f} us"))
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
        print(f"{name:<52}{value}")


def client_times(sink_port: int, count: int, size: int, filter_port: int | None = None,
                 reinjection: int | None = None) -> list[float]:
    """A client's transaction times through Postfix alone, or through Postfix in
    before-queue mode with the filters at `filter_port`."""
    if filter_port is None:
        postfix = PostfixInstance({**sink_transport(sink_port)})
    else:
        assert reinjection is not None
        postfix = filtering_postfix("before-queue", filter_port, reinjection, sink_port)
    postfix.start()
    try:
        return transaction_times(postfix.port, count, size)
    finally:
        postfix.stop()


if __name__ == "__main__":
    main()
