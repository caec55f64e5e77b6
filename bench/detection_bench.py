"""Detection benchmark (issue 29): how much of a spam/ham corpus SecuMail's SpamAssassin filter
stops, tags or lets through clean, with Bayes trained through SecuMail's own learning path.

    .venv/bin/python bench/detection_bench.py --train DIR... --test DIR...
        [--split FRACTION] [--limit N] [--no-bayes] [--stock-rules]
        [--tag 5] [--quarantine 8] [--reject 10]
        [--sessions 3] [--learners 2] [--keep-workdir] [--scores FILE]

A folder's name says its kind: a name containing "spam" holds spam, any other ham. The corpus
is the SpamAssassin public corpus (scripts/fetch-corpus.sh), one raw message per *.txt file.

  1. starts a spamd of its own (Debian's, -L: local tests only, no network; --allow-tell),
     with a site config directory and a Bayes database in a temporary directory: the
     machine's own Bayes database is never read or written
  2. trains every message of the --train folders through secumail.protocols.spamc.learn
     (SPAMC TELL: the code an admin's spam/ham report goes through), a few at once
  3. starts the real filter, secumail-spamd, in front of an in-process SMTP sink, and sends
     every message of the --test folders through it over SMTP, a few sessions at once
  4. prints one line per test folder, `NAME kind=spam|ham n=N stopped=P% tagged=P% clean=P%`
     (stopped: refused with 5xx or quarantined; tagged: delivered with X-Spam-Flag: YES;
     clean: delivered without it), then the CPU per test message of spamd and of the filter

--split F (tuning on one corpus): a message is in the train half when a hash of its file name
falls below F, else in the test half, so `--train spam-1 --test spam-1 --split 0.5` trains
and tests on two halves of spam-1 that never overlap. Without it, folders are used whole.
--scores FILE (tuning): one JSON line per test message, its score and the rules it hit (from
X-Spam-Status; run with --quarantine and --reject above any score, so that every message is
delivered and says them), for bench/detection_tune.py. Refused for the held-out folders:
their messages are measured as a whole, never looked at one by one.
Everything listens on 127.0.0.1; nothing needs the network at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from types import FrameType
from typing import Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from secumail.backend import BackendError
from secumail.message import normalize_newlines
from secumail.protocols.spamc import Kind, learn
from testkit.processes import free_port, service_env, wait_for_port

ROOT = Path(__file__).resolve().parents[1]

Side = Literal["train", "test"]
Outcome = Literal["stopped", "tagged", "clean", "error"]

SENDER = "bench@corpus.test"
SPAMD_USER = "debian-spamd"  # spamd refuses TELL while running as root
SPAMD_CHILDREN = 2  # as in the compose stack's SPAMD_OPTIONS
SCAN_TIMEOUT = 120.0  # the filter's relay_timeout, and each learn's
TEMPFAIL_TRIES = 4  # tries in all of a message answered 4xx (or whose session dropped)
MAX_SCANNED = 10 * 1024 * 1024  # spam_max_size: no corpus message skips the scan
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# What the spamassassin image adds to Debian's /etc/spamassassin (its Dockerfile copies each
# file under the name given here): its Bayes settings and SecuMail's scores.
SPAMD_DIR = ROOT / "services" / "spamd"
PRODUCTION_BAYES = (SPAMD_DIR / "bayes.cf", "60_secumail-bayes.cf")
PRODUCTION_RULES = ((SPAMD_DIR / "scores.cf", "60_secumail-scores.cf"),)
# The corpus's folders kept for acceptance (issue 29): never trained or tuned on.
HELD_OUT = frozenset({"spam-2", "easy-ham-2", "hard-ham-1"})


# --- the corpus ---------------------------------------------------------------------------


def kind_of(folder: Path) -> Kind:
    return "spam" if "spam" in folder.name.lower() else "ham"


def split_position(file_name: str) -> float:
    """Where a file falls in [0, 1): fixed by its name alone, so every run splits alike."""
    digest = hashlib.sha256(file_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def messages_in(folder: Path, side: Side, split: float | None, limit: int | None) -> list[Path]:
    files = sorted(folder.glob("*.txt"))  # the package's .json files are metadata
    if split is not None:
        files = [f for f in files if (split_position(f.name) < split) == (side == "train")]
    return files[:limit] if limit is not None else files


def wire_bytes(raw: bytes) -> bytes:
    """A corpus file as an SMTP client hands it over: without the mbox `From ` separator
    line (no MTA passes one on), with CRLF line ends as the filter itself normalises them."""
    if raw.startswith(b"From "):
        raw = raw.partition(b"\n")[2]
    return normalize_newlines(raw)


@dataclass
class TestFolder:
    path: Path
    kind: Kind
    messages: list[Path]
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    odd_replies: Counter[str] = field(default_factory=Counter)  # errors, unusual refusals
    # each message's outcome and reply, by file name
    by_message: dict[str, tuple[Outcome, str]] = field(default_factory=dict)

    def summary(self) -> str:
        n = len(self.messages)

        def share(outcome: Outcome) -> str:
            return f"{100 * self.outcomes[outcome] / n if n else 0.0:.1f}%"

        return (f"{self.path.name} kind={self.kind} n={n} stopped={share('stopped')} "
                f"tagged={share('tagged')} clean={share('clean')}")


# --- processes ------------------------------------------------------------------------------


class Process:
    """A daemon in a session of its own (a Ctrl-C reaches the bench, which stops it),
    its output in the work directory."""

    def __init__(self, name: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})},
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its children too: its own group
                self.proc.wait()


def wait_for_spamd(spamd: Process, port: int, timeout: float = 90.0) -> None:
    """spamd answers PING with PONG once its rules are compiled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and spamd.alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                if b"PONG" in sock.recv(200):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"spamd did not start:\n{spamd.output_tail()}")


def spamd_user() -> pwd.struct_passwd | None:
    """Who spamd's children run as: debian-spamd when the bench runs as root, else us."""
    return pwd.getpwnam(SPAMD_USER) if os.getuid() == 0 else None


def production_bayes_lines() -> list[str]:
    """The image's Bayes settings, but those the bench sets itself (its own database)."""
    return [line for line in PRODUCTION_BAYES[0].read_text().splitlines(keepends=True)
            if line.split()[:1] not in (["bayes_path"], ["bayes_file_mode"], ["use_bayes"])]


def check_own_database(config: Path) -> None:
    """Refuse to start when any other config file names a Bayes path: the machine's
    database must stay out of reach."""
    for conf in config.glob("*.cf"):
        for line in conf.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["bayes_path"] and words[1:2] != [f"{config}/bayes/bayes"]:
                raise RuntimeError(f"{conf.name} sets {line.strip()!r}: not the bench's own")


def start_redis(workdir: Path) -> tuple[Process, int]:
    """A Redis of the bench's own for --bayes-redis (no persistence: the run's only)."""
    port = free_port()
    redis = Process("redis", [shutil.which("redis-server") or "/usr/bin/redis-server",
                              "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(workdir)],
                    workdir / "redis.log")
    wait_for_port(port, timeout=10)
    return redis, port


def site_config(workdir: Path, use_bayes: bool, stock_rules: bool, autolearn: bool,
                redis_port: int | None = None) -> Path:
    """Debian's site config, the image's additions (but SecuMail's scores with
    `stock_rules`), and a Bayes database of the bench's own."""
    config = workdir / "spamassassin"
    # sa-update's keyring is not config (and may hold gpg-agent's sockets, which copy fails on)
    shutil.copytree("/etc/spamassassin", config, symlinks=False,
                    ignore=shutil.ignore_patterns("sa-update-keys"))
    bayes = config / "bayes"
    bayes.mkdir(mode=0o755)
    user = spamd_user()
    if user is not None:
        os.chown(bayes, user.pw_uid, user.pw_gid)
    (config / PRODUCTION_BAYES[1]).write_text("".join(production_bayes_lines()))
    if not stock_rules:
        for source, name in PRODUCTION_RULES:
            shutil.copyfile(source, config / name)
    with (config / "local.cf").open("a") as local:  # read after the files above
        local.write(
            "\n# detection_bench.py: a Bayes database of its own, never the machine's\n"
            f"bayes_path {bayes}/bayes\n"
            "bayes_file_mode 0777\n"
            # No learning from the test messages (but with --autolearn): each verdict then
            # depends on the training set alone, not on which test messages came before it.
            f"bayes_auto_learn {int(autolearn)}\n"
        )
        local.write(f"use_bayes {int(use_bayes)}\n")
        if redis_port is not None:  # SpamAssassin's Redis store, in the bench's own Redis
            local.write("bayes_store_module Mail::SpamAssassin::BayesStore::Redis\n"
                        f"bayes_sql_dsn server=127.0.0.1:{redis_port};database=0\n"
                        "bayes_token_ttl 21d\nbayes_seen_ttl 8d\n")
    check_own_database(config)
    return config


def start_spamd(workdir: Path, config: Path) -> tuple[Process, str]:
    binary = shutil.which("spamd") or "/usr/sbin/spamd"
    port = free_port()
    user = spamd_user()
    as_user = [f"--username={SPAMD_USER}", f"--groupname={SPAMD_USER}"] if user else []
    spamd = Process("spamd", [
        binary, "-L", "--allow-tell", "-x", f"--listen=127.0.0.1:{port}", *as_user,
        f"--max-children={SPAMD_CHILDREN}", "--min-children=1", f"--siteconfigpath={config}",
        "--syslog=stderr",
    ], workdir / "spamd.log", env={"HOME": str(workdir / "home")})
    wait_for_spamd(spamd, port)
    return spamd, f"127.0.0.1:{port}"


def start_filter(workdir: Path, spamd_address: str, sink_port: int, tag: float,
                 quarantine: float, reject: float) -> tuple[Process, int]:
    port = free_port()
    env = service_env(
        spamd_listen=f"127.0.0.1:{port}",
        spamd_next_hop=f"127.0.0.1:{sink_port}",
        spamassassin_address=spamd_address,
        quarantine_dir=str(workdir / "quarantine"),
        relay_timeout=str(SCAN_TIMEOUT),
        spam_tag_score=str(tag),
        spam_quarantine_score=str(quarantine),
        spam_reject_score=str(reject),
        spam_max_size=str(MAX_SCANNED),
    )
    script = Path(sys.executable).parent / "secumail-spamd"
    service = Process("secumail-spamd", [str(script)], workdir / "filter.log", env)
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        raise RuntimeError(f"secumail-spamd did not start:\n{service.output_tail()}") from None
    return service, port


def bayes_counts(config: Path, workdir: Path) -> str:
    """nspam/nham as the Bayes database holds them (sa-learn, as spamd's user: no file of
    the database comes to belong to root)."""
    user = spamd_user()
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
              "--clear-groups"] if user else []
    done = subprocess.run(
        [*prefix, shutil.which("sa-learn") or "/usr/bin/sa-learn", "-L",
         f"--siteconfigpath={config}", "--dump", "magic"],
        capture_output=True, text=True, env={**os.environ, "HOME": str(workdir / "home")},
        timeout=120,
    )
    counts = {}
    for line in done.stdout.splitlines():  # "0.000  0  250  0  non-token data: nspam"
        fields = line.split()
        if len(fields) >= 4 and fields[-1] in ("nspam", "nham"):
            counts[fields[-1]] = fields[2]
    if not counts:
        return f"unreadable ({(done.stderr or done.stdout).strip()[:200]})"
    return " ".join(f"{name}={value}" for name, value in sorted(counts.items(), reverse=True))


# --- CPU from /proc -------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # the command name in parentheses may hold spaces: split after its closing one
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU a process and its descendants used so far: its own, its children's that ended
    (cutime, cstime: spamd replaces a child after so many connections) and the live ones'."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
            except (OSError, IndexError):
                pass  # ended meanwhile
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), counted from `state` (3)
        total += sum(int(value) for value in fields[11:15])
        todo.extend(parents.get(pid, []))
    return total / CLOCK_TICKS


# --- training -------------------------------------------------------------------------------


@dataclass
class Training:
    sent: Counter[Kind] = field(default_factory=Counter)
    learned: int = 0
    known: int = 0
    failed: int = 0
    first_error: str = ""


async def train(address: str, folders: list[tuple[Path, list[Path]]], concurrency: int
                ) -> Training:
    """Every train message through spamc.learn, `concurrency` in flight at once."""
    result = Training()
    todo: Iterator[tuple[Kind, Path]] = (
        (kind_of(folder), path) for folder, paths in folders for path in paths)
    total = sum(len(paths) for _, paths in folders)

    async def learner() -> None:
        for kind, path in todo:  # one shared iterator: each message goes to one learner
            message = wire_bytes(path.read_bytes())
            try:
                if await learn(address, message, kind, SCAN_TIMEOUT):
                    result.learned += 1
                else:
                    result.known += 1
            except BackendError as error:
                result.failed += 1
                result.first_error = result.first_error or f"{path.name}: {error}"
            result.sent[kind] += 1
            done = sum(result.sent.values())
            if done % 500 == 0:
                print(f"  trained {done}/{total}", file=sys.stderr, flush=True)

    await asyncio.gather(*(learner() for _ in range(concurrency)))
    return result


# --- the sink and the sending ---------------------------------------------------------------


def spam_flag(message: bytes) -> str:
    """X-Spam-Flag of a delivered message: YES, NO, or none (not scanned)."""
    headers = BytesHeaderParser().parsebytes(message)
    return str(headers.get("X-Spam-Flag", "none")).strip().upper()


def spam_status(message: bytes) -> str:
    """X-Spam-Status of a delivered message, unfolded."""
    status = BytesHeaderParser().parsebytes(message).get("X-Spam-Status", "")
    return " ".join(str(status).split())


class FlagSink:
    """The filter's next hop: stores no message, answers with the X-Spam-Flag it saw. The
    filter relays in lockstep and hands the next hop's answer back to the client, so each
    sender learns its own message's fate from its 250 reply. It keeps each message's
    X-Spam-Status by its recipient (each message has its own: the filter does not pass the
    envelope on to spamd, so the address changes no score)."""

    def __init__(self) -> None:
        self.delivered: Counter[str] = Counter()
        self.statuses: dict[str, str] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        message = content if isinstance(content, bytes) else b""
        flag = spam_flag(message)
        status = spam_status(message)
        with self.lock:
            self.delivered[flag] += 1
            for recipient in envelope.rcpt_tos:
                self.statuses[recipient] = status
        return f"250 2.0.0 Ok: stored flag={flag}"


class LongLinesSMTP(SMTP):
    # aiosmtpd refuses a line over 1,000 octets (500 Line too long) where Postfix, the
    # filter's real next hop, takes it: a few corpus messages have such lines.
    line_length_limit = 1 << 20


class SinkController(Controller):
    def factory(self) -> SMTP:
        return LongLinesSMTP(self.handler, **self.SMTP_kwargs)


def outcome_of(code: int, reply: str) -> Outcome | None:
    """What a final reply says about a message; None: a 4xx, to try again."""
    if 200 <= code < 300:
        if "flag=YES" in reply:
            return "tagged"
        if "flag=" in reply:  # NO, or none: delivered without the spam flag
            return "clean"
        if "quarantined" in reply:
            return "stopped"
        return "error"  # accepted but neither delivered nor quarantined
    if 500 <= code < 600:
        return "stopped"
    return None


def recipient_of(path: Path) -> str:
    """Each message's own recipient: how the sink's X-Spam-Status finds its file."""
    return f"{path.stem.replace('.', '-')}@corpus.test"


def send_one(smtp: smtplib.SMTP, message: bytes, recipient: str) -> tuple[int, str]:
    code, reply = smtp.mail(SENDER)
    if code == 250:
        code, reply = smtp.rcpt(recipient)
        if code in (250, 251):
            code, reply = smtp.data(message)
            return code, reply.decode(errors="replace")
    smtp.rset()
    return code, reply.decode(errors="replace")


def send_folder(port: int, folder: TestFolder, sessions: int, stop: threading.Event) -> None:
    """Every message of `folder` to the filter over `sessions` SMTP sessions at once."""
    todo = iter(folder.messages)
    lock = threading.Lock()

    def record(path: Path, outcome: Outcome, code: int, reply: str) -> None:
        with lock:
            folder.outcomes[outcome] += 1
            folder.by_message[path.name] = (outcome, reply)
            if outcome == "error" or (outcome == "stopped" and "as spam" not in reply
                                      and "quarantined" not in reply):
                folder.odd_replies[f"{code} {reply.splitlines()[-1][:90]}"] += 1

    def session() -> None:
        smtp: smtplib.SMTP | None = None
        try:
            while not stop.is_set():
                with lock:
                    path = next(todo, None)
                if path is None:
                    return
                message = wire_bytes(path.read_bytes())
                code, reply = 0, "not sent"
                for attempt in range(TEMPFAIL_TRIES):
                    if attempt:
                        time.sleep(attempt)  # the filter or spamd may be busy: back off
                    try:
                        if smtp is None:
                            smtp = smtplib.SMTP("127.0.0.1", port, timeout=SCAN_TIMEOUT + 30)
                            smtp.ehlo()
                        code, reply = send_one(smtp, message, recipient_of(path))
                    except (smtplib.SMTPException, OSError) as error:
                        code, reply = 0, f"session failed: {error}"
                        smtp = None  # a new session for the next try
                        continue
                    outcome = outcome_of(code, reply)
                    if outcome is not None:
                        record(path, outcome, code, reply)
                        break
                else:
                    record(path, "error", code, reply)
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    pass

    # daemon threads: a Ctrl-C ends the run at once, the `finally` in main stops the rest
    threads = [threading.Thread(target=session, daemon=True) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def write_scores(path: Path, tests: list[TestFolder], statuses: dict[str, str]) -> None:
    """One JSON line per test message: its folder, kind, outcome, score and rules hit."""
    with path.open("w") as out:
        for folder in tests:
            for message in folder.messages:
                outcome, reply = folder.by_message.get(message.name, ("error", "not sent"))
                status = statuses.get(recipient_of(message), "")
                score = re.search(r"score=(-?[0-9.]+)", status) or re.search(
                    r"score (-?[0-9.]+)", reply)
                tests_hit = re.search(r"tests=(\S+)", status)
                out.write(json.dumps({
                    "folder": folder.path.name, "file": message.name, "kind": folder.kind,
                    "outcome": outcome, "score": float(score.group(1)) if score else None,
                    "tests": tests_hit.group(1).split(",") if tests_hit else [],
                }) + "\n")


# --- the run --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", nargs="*", type=Path, default=[],
                        help="folders to train Bayes on (none: Bayes stays untrained)")
    parser.add_argument("--test", nargs="+", type=Path, required=True,
                        help="folders to send through the filter")
    parser.add_argument("--split", type=float, metavar="FRACTION",
                        help="train on the files whose name hashes below FRACTION, "
                        "test on the rest (for the same folders in --train and --test)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="at most N messages per folder (after --split)")
    parser.add_argument("--no-bayes", action="store_true",
                        help="use_bayes 0, no training: the untrained baseline")
    parser.add_argument("--stock-rules", action="store_true",
                        help="without SecuMail's scores (services/spamd/scores.cf): "
                        "SpamAssassin's stock scores")
    parser.add_argument("--autolearn", action="store_true",
                        help="bayes_auto_learn 1 while testing: SpamAssassin learns from the "
                        "test messages it is sure of, in the order they come")
    parser.add_argument("--tag", type=float, default=5.0,
                        help="SECUMAIL_SPAM_TAG_SCORE (default 5)")
    parser.add_argument("--quarantine", type=float, default=8.0,
                        help="SECUMAIL_SPAM_QUARANTINE_SCORE (default 8)")
    parser.add_argument("--reject", type=float, default=10.0,
                        help="SECUMAIL_SPAM_REJECT_SCORE (default 10)")
    parser.add_argument("--sessions", type=int, default=3,
                        help="SMTP sessions at once (default 3)")
    parser.add_argument("--learners", type=int, default=2,
                        help="messages being learned at once (default 2)")
    parser.add_argument("--bayes-redis", action="store_true",
                        help="Bayes in SpamAssassin's Redis store (a redis-server of the "
                        "bench's own) instead of its DB_File database")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the spamd and filter logs and the Bayes database")
    parser.add_argument("--scores", type=Path, metavar="FILE",
                        help="write each test message's score and rules hit (JSON lines), "
                        "for bench/detection_tune.py; not for held-out folders")
    args = parser.parse_args()
    if args.split is not None and not 0 < args.split < 1:
        parser.error("--split takes a fraction between 0 and 1")
    # Acceptance folders: measured with, never trained on (nor tuned on: by hand).
    if held := [f for f in args.train if f.name in HELD_OUT]:
        parser.error(f"{', '.join(map(str, held))}: held out for acceptance, never trained on")
    if args.scores and (held := [f for f in args.test if f.name in HELD_OUT]):
        parser.error(f"{', '.join(map(str, held))}: held out for acceptance, measured as a "
                     "whole: no scores per message (--scores)")
    for folder in [*args.train, *args.test]:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder (scripts/fetch-corpus.sh fetches the corpus)")
    return args


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same clean-up as a Ctrl-C


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    started = time.perf_counter()
    train_sets = [(folder, messages_in(folder, "train", args.split, args.limit))
                  for folder in args.train]
    tests = [TestFolder(folder, kind_of(folder),
                        messages_in(folder, "test", args.split, args.limit))
             for folder in args.test]
    workdir = Path(tempfile.mkdtemp(prefix="secumail-detection-"))
    workdir.chmod(0o755)  # spamd's children (debian-spamd) read the config below it
    (workdir / "home").mkdir()
    user = spamd_user()
    if user is not None:
        os.chown(workdir / "home", user.pw_uid, user.pw_gid)
    processes: list[Process] = []
    sink: Controller | None = None
    stop_sending = threading.Event()
    try:
        redis: Process | None = None
        redis_port = None
        if args.bayes_redis:
            redis, redis_port = start_redis(workdir)
            processes.append(redis)
        config = site_config(workdir, use_bayes=not args.no_bayes,
                             stock_rules=args.stock_rules, autolearn=args.autolearn,
                             redis_port=redis_port)
        spamd, spamd_address = start_spamd(workdir, config)
        processes.append(spamd)
        print(f"spamd on {spamd_address} (-L, {SPAMD_CHILDREN} children), Bayes "
              f"{'off' if args.no_bayes else 'in ' + str(config / 'bayes')}", flush=True)

        if args.no_bayes:
            print("no Bayes: training skipped", flush=True)
        elif train_sets:
            began = time.perf_counter()
            training = asyncio.run(train(spamd_address, train_sets, args.learners))
            print(f"trained {training.sent['spam']} spam and {training.sent['ham']} ham "
                  f"messages ({args.learners} at once): {training.learned} learned, "
                  f"{training.known} already known, {training.failed} failed, in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
            if training.failed:
                print(f"  first failure: {training.first_error}", flush=True)
            print(f"Bayes database: {bayes_counts(config, workdir)}", flush=True)

        handler = FlagSink()
        sink_port = free_port()
        sink = SinkController(handler, hostname="127.0.0.1", port=sink_port)
        sink.start()
        service, filter_port = start_filter(workdir, spamd_address, sink_port, args.tag,
                                            args.quarantine, args.reject)
        processes.append(service)

        total = sum(len(folder.messages) for folder in tests)
        print(f"testing {total} messages over {args.sessions} SMTP sessions "
              f"(tag {args.tag:g}, quarantine {args.quarantine:g}, reject {args.reject:g})",
              flush=True)
        spamd_before, filter_before = tree_cpu_seconds(spamd.pid), tree_cpu_seconds(service.pid)
        redis_before = tree_cpu_seconds(redis.pid) if redis else 0.0
        began = time.perf_counter()
        for folder in tests:
            send_folder(filter_port, folder, args.sessions, stop_sending)
            print(f"  tested {folder.path.name}", file=sys.stderr, flush=True)
        test_seconds = time.perf_counter() - began
        spamd_cpu = tree_cpu_seconds(spamd.pid) - spamd_before
        filter_cpu = tree_cpu_seconds(service.pid) - filter_before
        redis_cpu = tree_cpu_seconds(redis.pid) - redis_before if redis else 0.0

        for folder in tests:
            print(folder.summary())
        if args.scores:
            write_scores(args.scores, tests, handler.statuses)
            print(f"scores of {total} messages in {args.scores}")
        per_message = max(total, 1)
        print(f"spamd CPU per message: {1000 * spamd_cpu / per_message:.1f} ms")
        print(f"filter CPU per message: {1000 * filter_cpu / per_message:.1f} ms")
        if redis:
            print(f"redis CPU per message (Bayes store): {1000 * redis_cpu / per_message:.1f} ms")
        print(f"wall time: test phase {test_seconds:.1f} s "
              f"({total / test_seconds if test_seconds else 0:.1f} messages/s), "
              f"whole run {time.perf_counter() - started:.1f} s")

        # what did not fit the three columns, so the sums short of 100% are explained
        for folder in tests:
            if folder.outcomes["error"]:
                print(f"errors: {folder.path.name}: {folder.outcomes['error']} messages "
                      f"neither delivered nor refused after {TEMPFAIL_TRIES} tries")
            for reply, count in folder.odd_replies.most_common(5):
                print(f"  {folder.path.name}: {count} x {reply}")
        replied = sum(f.outcomes["tagged"] + f.outcomes["clean"] for f in tests)
        if sum(handler.delivered.values()) != replied:
            print(f"odd: the sink got {sum(handler.delivered.values())} messages "
                  f"({dict(handler.delivered)}), the senders saw {replied} delivered")
        return 1 if any(f.outcomes["error"] for f in tests) else 0
    except KeyboardInterrupt:
        print("interrupted: stopping spamd and the filter", file=sys.stderr)
        return 130
    except RuntimeError as error:  # a daemon that did not start: its log says why
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        stop_sending.set()
        for process in reversed(processes):
            process.stop()
        if sink is not None:
            sink.stop()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
