"""`secumail-track`: where did a message go? The gateway's tracking search, in a shell.

    docker compose exec gateway secumail-track --recipient dave@example.org --since 2h
    secumail-track --url http://127.0.0.1:8080 --sender alice@remote.example --json

The admin token comes from SECUMAIL_ADMIN_TOKEN (set in the gateway's container) or
--token-file. Prints each message found, newest first: where it ended, then its path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx2

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """`90m`, `2h`, `7d` ago, or a Unix time."""
    found = DURATION.match(text.strip())
    if found:
        return now - float(found[1]) * UNITS[found[2]]
    return float(text)


def _clock(moment: float, with_date: bool) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S",
                         time.localtime(moment))


def render(messages: list[dict[str, Any]], cut: str = "") -> str:
    """The messages as an admin reads them: one summary line, then a line per event; and,
    when the gateway cut the search short, why."""
    note = (f"not every message: the search was cut short ({cut}); narrow it (--since, one "
            "more criterion) to see the rest\n") if cut else ""
    if not messages:
        return "no message found\n" + note
    lines = []
    for message in messages:
        recipients = ",".join(message["recipients"]) or "?"
        ids = " ".join(message["queue_ids"])
        lines.append(f"{_clock(message['first'], True)}  {message['outcome'].upper()}  "
                     f"<{message['sender']}> -> {recipients}  client {message['client'] or '?'}"
                     + (f"  queue {ids}" if ids else "")
                     + (f"  <{message['message_id']}>" if message["message_id"] else ""))
        for event in message["events"]:
            lines.append(f"  {_clock(event['time'], False)}  {event['service']:<8} "
                         f"{event['outcome']:<11} {event['detail']}  [{event['replica']}]")
        lines.append("")
    return "\n".join(lines) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secumail-track", description=__doc__.split("\n")[0])
    for name in ("sender", "recipient", "client", "message-id", "queue-id"):
        parser.add_argument(f"--{name}", default="")
    parser.add_argument("--since", default="7d", help="90m, 2h, 7d ago or a Unix time")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--token-file", type=Path, help="default: $SECUMAIL_ADMIN_TOKEN")
    parser.add_argument("--json", action="store_true", help="the API's answer as it is")
    args = parser.parse_args(argv)
    token = (args.token_file.read_text().strip() if args.token_file
             else os.environ.get("SECUMAIL_ADMIN_TOKEN", ""))
    if not token:
        parser.error("no admin token: set SECUMAIL_ADMIN_TOKEN or give --token-file")
    criteria = {"sender": args.sender, "recipient": args.recipient, "client": args.client,
                "message_id": args.message_id, "queue_id": args.queue_id}
    if not any(criteria.values()):
        parser.error("give at least one of --sender --recipient --client --message-id "
                     "--queue-id")
    try:
        since = parse_since(args.since, time.time())
    except ValueError:
        parser.error(f"--since: not a duration or a time: {args.since!r}")
    params = {**{k: v for k, v in criteria.items() if v}, "since": since, "limit": args.limit}
    try:
        response = httpx2.get(f"{args.url.rstrip('/')}/admin/tracking", params=params,
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except httpx2.HTTPError as error:
        print(f"secumail-track: cannot reach the gateway at {args.url}: {error}",
              file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"secumail-track: the gateway answered {response.status_code}: "
              f"{response.text[:300]}", file=sys.stderr)
        return 2
    answer = response.json()
    sys.stdout.write(json.dumps(answer, indent=2) + "\n" if args.json
                     else render(answer["messages"], answer.get("cut", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
