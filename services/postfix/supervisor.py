"""The Postfix container's main process: `postfix start-fg` as a child, watched.

It passes Postfix's log (`maillog_file = /dev/stdout`) on to its own stdout, unchanged, and
counts it for the metrics listener (exporter.py). SIGTERM or SIGINT first lets the
deliveries and SMTP sessions under way finish (finish_deliveries), then runs `postfix
stop`: the master process ends its children, the queue stays on its volume, `start-fg`
returns, and the supervisor exits 0. If the master dies on its own, the supervisor exits with its
status and Docker restarts the container. Postfix's master puts itself in a session of its
own, so signals to our child would not reach it: `postfix stop` is the one reliable way.
In the container the supervisor is PID 1, with no init: the master reaps its own children,
and when the master ends the supervisor ends too, so no orphan outlives them.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from secumail.logs import log_event
from secumail.settings import Settings
from services.postfix.exporter import agent_user, start_agent
from services.postfix.outbound_tls import start_sts_resolver
from services.postfix.resolver import start_resolver

log = logging.getLogger("secumail.postfix")

QUEUE_DIR = Path("/var/spool/postfix")
STOP_RETRY = 5.0  # seconds; a stop that came before the master was up is tried again
FINISH_TIMEOUT = 20.0  # seconds deliveries under way get at a stop (compose gives 30 in all)
DELIVERY_AGENTS = frozenset({"smtp", "lmtp", "virtual", "local", "pipe"})
# The container's healthcheck (an EHLO on 127.0.0.1:25 every 10 s) would fill the log with
# its connect and disconnect lines; nothing but the healthcheck connects from loopback.
HEALTHCHECK_SESSION = re.compile(
    rb"postfix/smtpd\[\d+\]: (?:connect|disconnect|lost connection after \w+) from "
    rb"[^\s\[]*\[127\.0\.0\.1\]")


def shown(line: bytes) -> bool:
    """Whether a line of Postfix's log goes to the container's log (all but the
    healthcheck's sessions; the metrics count every line)."""
    return HEALTHCHECK_SESSION.search(line) is None


def finish_deliveries(postfix: Sequence[str], timeout: float = FINISH_TIMEOUT) -> int:
    """Before `postfix stop`: let the deliveries and the SMTP sessions under way end, and
    start no new one.

    `postfix stop` kills delivery agents in the middle of a delivery. When the next hop (the
    filters, and behind them Postfix's own 10027) had already queued its copy, the message
    stays in our queue and goes out again after the restart: a duplicate. Likewise, in
    before-queue mode, a port-25 session holds a message that 10027 may have queued already:
    cut before its 250, the client sends it again. Deferring every transport, closing the
    port-25 listener (`smtp/inet`) and reloading makes the queue manager start nothing new
    and the master accept no new session, while the running agents and sessions finish.
    main.cf and master.cf are rendered afresh at the next start, which undoes both. Returns
    how many were still busy at the timeout.
    """
    postconf = ["postconf", *postfix[1:]]  # the same `-c DIR`, if any
    services = subprocess.run([*postconf, "-M"], capture_output=True, text=True).stdout
    transports = sorted({
        fields[0] for fields in (line.split() for line in services.splitlines())
        if len(fields) >= 8 and fields[1] == "unix" and fields[7] in DELIVERY_AGENTS
    })
    subprocess.run([*postconf, "-e", f"defer_transports = {' '.join(transports)}"],
                   capture_output=True, check=False)
    subprocess.run([*postconf, "-M#", "smtp/inet"], capture_output=True, check=False)
    subprocess.run([*postfix, "reload"], capture_output=True, check=False)
    queue_dir = subprocess.run([*postconf, "-h", "queue_directory"], capture_output=True,
                               text=True).stdout.strip()
    deadline = time.monotonic() + timeout
    while (busy := _busy(Path(queue_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return busy


def _busy(queue_dir: Path) -> int:
    """Delivery agents and port-25 smtpd processes of this Postfix's master still running
    (idle ones leave at reload)."""
    try:
        master = int((queue_dir / "pid/master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            comm = text[text.index("(") + 1:text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            if ppid != master:
                continue
            if comm == "smtpd":
                # Which service: the master starts each with "-n <name>".
                count += b"\0-n\0smtp\0" in (stat.parent / "cmdline").read_bytes()
            else:
                count += comm in DELIVERY_AGENTS
        except OSError:
            continue  # ended meanwhile
    return count


class Supervisor:
    def __init__(
        self, command: list[str], stop_command: list[str], on_line: Callable[[str], None],
        output: BinaryIO | None = None, running: threading.Event | None = None,
        before_stop: Callable[[], object] = lambda: None,
    ) -> None:
        self.command = command
        self.stop_command = stop_command
        self.before_stop = before_stop
        self.on_line = on_line
        self.output = output or sys.stdout.buffer
        self.running = running or threading.Event()  # set while the child runs
        self.stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Run until the child ends; its status, or 0 when we were asked to stop."""
        self._proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.running.set()
        pump = threading.Thread(target=self._pump, name="maillog", daemon=True)
        pump.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        while True:
            # Short waits: the kernel may hand SIGTERM to another thread, and Python runs
            # the handler only when the main thread gets back to bytecode; a blocking
            # waitpid() would never return for it.
            try:
                status = self._proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        self.running.clear()
        pump.join(timeout=5)  # the rest of the log: postlogd may outlive the master briefly
        if self.stopping.is_set():
            log_event(log, "postfix stopped", status=status)
            return 0
        log_event(log, "postfix ended on its own", logging.ERROR, status=status)
        return status if status > 0 else 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            log_event(log, "stopping postfix", signal=signal.Signals(signum).name)
            threading.Thread(target=self._stop, name="stop", daemon=True).start()

    def _stop(self) -> None:
        assert self._proc is not None
        try:
            busy = self.before_stop()
            log_event(log, "deliveries under way finished", left_busy=busy)
        except Exception:
            log.exception("could not wait for the deliveries under way; stopping anyway")
        while self._proc.poll() is None:
            subprocess.run(self.stop_command, stdin=subprocess.DEVNULL, check=False,
                           capture_output=True)
            try:
                self._proc.wait(STOP_RETRY)
            except subprocess.TimeoutExpired:
                continue

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            if shown(raw):
                self.output.write(raw)
                self.output.flush()
            try:
                self.on_line(raw.decode("utf-8", "replace"))
            except Exception:
                log.exception("could not count a log line")


def supervise(settings: Settings, mailbox_base: str, queue_dir: Path = QUEUE_DIR,
              postfix: tuple[str, ...] = ("postfix",), drop_agent: bool = True) -> int:
    """Start the metrics and probe-mailbox listener (as the mailboxes' owner, unless
    `drop_agent` is false), then run Postfix until stopped. (`postfix` may carry `-c DIR`:
    the tests run a Postfix of their own.)"""
    running = threading.Event()
    user = agent_user(mailbox_base) if drop_agent else None
    feed, agent = start_agent(settings, queue_dir, mailbox_base, running, user)
    resolver = start_resolver(settings)
    sts_resolver = start_sts_resolver(settings)
    supervisor = Supervisor([*postfix, "start-fg"], [*postfix, "stop"], feed,
                            running=running, before_stop=lambda: finish_deliveries(postfix))
    log_event(log, "starting postfix", metrics=str(settings.metrics_listen))
    try:
        return supervisor.run()
    finally:
        for keeper in (agent, resolver, sts_resolver):
            if keeper is not None:
                keeper.stop()
