"""TLS reports (issue 34 item 3): what counting sessions adds to the Postfix container's log
reader, and to the gateway's collection, measured alone.

With SECUMAIL_TLSRPT on, every line of Postfix's log also goes through `TlsSessions.feed`
(a substring test for all but the smtp client's lines), and each outbound session costs a
regex match, a read of the MTA-STS resolver's SQLite cache and a tracking event. Its peer is
the same reader without it (`PostfixEvents.feed`, what every line pays today), in the same
run, over the same log: one inbound message's lines (connect, client, message-id, queued,
delivered) and one outbound session (TLS established, status) per round, a cache of 1,000
policies. Then the gateway's side: `TlsReporter.count` on batches of 1,000 collected
events, with the store on disk. Prints microseconds per line and per session, and ratios.

    .venv/bin/python bench/tlsrpt_bench.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from gateway.tls_reports import TlsReporter
from gateway.tracking import StoredEvent
from secumail.settings import Settings
from services.postfix.events import PostfixEvents, TlsSessions
from services.postfix.outbound_tls import cached_policies

ROOT = Path(__file__).resolve().parents[1]

INBOUND = [
    "Dec 07 21:09:10 mx postfix/smtpd[300]: connect from client.example[198.51.100.{i}]",
    "Dec 07 21:09:10 mx postfix/smtpd[300]: {q}: client=client.example[198.51.100.{i}]",
    "Dec 07 21:09:10 mx postfix/cleanup[301]: {q}: message-id=<{i}@client.example>",
    "Dec 07 21:09:10 mx postfix/qmgr[302]: {q}: from=<a@client.example>, size=2048, nrcpt=1 "
    "(queue active)",
    "Dec 07 21:09:10 mx postfix/lmtp[303]: {q}: to=<bob@secumail.test>, relay=mailbox[private/"
    "dovecot-lmtp], delay=0.1, delays=0.1/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)",
]
OUTBOUND = [
    "Dec 07 21:09:10 mx postfix/smtp[537]: Verified TLS connection established to "
    "mx.d{d}.example[192.0.2.{i}]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    " key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
    "Dec 07 21:09:10 mx postfix/smtp[537]: {q}: to=<postmaster@d{d}.example>, relay=mx.d{d}."
    "example[192.0.2.{i}]:25, delay=0.2, delays=0.14/0.02/0.04/0, dsn=2.0.0, status=sent "
    "(250 OK)",
]
DOMAINS = 1000


def log_lines(rounds: int) -> list[str]:
    lines = []
    for n in range(rounds):
        values = {"i": n % 250 + 1, "q": f"{n:011X}", "d": n % DOMAINS}
        lines += [line.format(**values) for line in INBOUND + OUTBOUND]
    return lines


def policy_cache(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("create table sts_policy_cache (domain text, ts integer, pol_id text, "
               "pol_body text)")
    db.execute("create unique index sts_policy_domain on sts_policy_cache (domain)")
    body = {"mode": "enforce", "max_age": 86400 * 365}
    db.executemany("insert into sts_policy_cache values (?, ?, ?, ?)",
                   [(f"d{d}.example", int(time.time()), "1",
                     json.dumps({**body, "mx": [f"mx.d{d}.example"]})) for d in range(DOMAINS)])
    db.commit()
    db.close()


def per_line(lines: list[str], with_sessions: bool, cache: Path) -> tuple[float, int]:
    """Microseconds per line; the sessions made."""
    events = PostfixEvents("clamav")
    sessions = TlsSessions("clamav", cached_policies(cache))
    made = []
    start = time.perf_counter()
    for line in lines:
        events.feed(line)
        if with_sessions:
            made += sessions.feed(line)
    return (time.perf_counter() - start) / len(lines) * 1e6, len(made)


async def no_dns(name: str) -> list[str] | None:
    return None  # counting asks no DNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    lines = log_lines(args.rounds)
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "policies.sqlite"
        policy_cache(cache)
        runs = []
        for _ in range(3):  # alternated, the best of three each
            runs.append((per_line(lines, False, cache)[0], *per_line(lines, True, cache)))
        without = min(r[0] for r in runs)
        with_tls = min(r[1] for r in runs)
        sessions = runs[0][2]
        per_session = (with_tls - without) * len(lines) / sessions
        print(f"log reader, {len(lines)} lines, {sessions} outbound sessions")
        print(f"  without TLS reports (the peer): {without:.2f} us/line")
        print(f"  with TLS reports:               {with_tls:.2f} us/line "
              f"({with_tls / without:.2f}x the peer's time; +{per_session:.1f} us a session)")

        reader = TlsSessions("clamav", cached_policies(cache))
        stored = [StoredEvent(e, "postfix-1") for line in lines for e in reader.feed(line)]
        settings = Settings(tlsrpt=True, dmarc_report_db=f"{folder}/dmarc/reports.sqlite",
                            domains=["secumail.test"])
        counter = Counter("reports", "", ["result"], registry=CollectorRegistry())
        reporter = TlsReporter(settings, no_dns, counter)
        start = time.perf_counter()
        for at in range(0, len(stored), 1000):
            reporter.count("postfix", stored[at:at + 1000])
        spent = time.perf_counter() - start
        print(f"gateway, counting {len(stored)} collected sessions in batches of 1,000: "
              f"{spent / len(stored) * 1e6:.1f} us a session")


if __name__ == "__main__":
    main()
