"""Sends numbered messages over several SMTP sessions the way an MTA does: a 4xx or a broken
connection means try again a second later, a 5xx is a failure. Run as a program so that it
can run inside a test host's network namespace (`ip netns exec NS python -m ...`); prints
what happened as one JSON object.

    python -m tests.e2e.bulk_send --server 198.51.100.1:2525 --count 1000 --sessions 20 TAG
"""

from __future__ import annotations

import argparse
import json
import smtplib
import threading
import time
from collections import Counter
from email.message import EmailMessage
from email.utils import make_msgid


def message(tag: str, n: int, sender: str, recipient: str) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, recipient, f"{tag} {n}"
    mail["Message-ID"] = make_msgid(idstring=f"{tag}.{n}", domain="remote.test")
    mail.set_content(f"message {n} of run {tag}\n" + "lorem ipsum dolor sit amet\n" * 40)
    return mail.as_bytes()


def send_one(host: str, port: int, helo: str, sender: str, recipient: str,
             body: bytes) -> tuple[int, str]:
    """(250, "") or the code and text that refused it (code 0: no answer)."""
    try:
        with smtplib.SMTP(host, port, local_hostname=helo, timeout=120) as smtp:
            smtp.sendmail(sender, [recipient], body)
    except smtplib.SMTPRecipientsRefused as error:
        [(code, reply)] = error.recipients.values()
        return code, reply.decode(errors="replace")
    except smtplib.SMTPResponseException as error:
        return error.smtp_code, error.smtp_error.decode(errors="replace")
    except (smtplib.SMTPException, OSError) as error:
        return 0, str(error)
    return 250, ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tag")
    parser.add_argument("--server", required=True, help="host:port")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--helo", default="mail.remote.test")
    parser.add_argument("--sender", default="bulk@remote.test")
    parser.add_argument("--recipient", default="dave@secumail.test")
    parser.add_argument("--deadline", type=float, default=900, help="seconds, in all")
    args = parser.parse_args()
    host, port = args.server.rsplit(":", 1)
    todo = list(range(args.count))
    accepted: list[int] = []
    temporary: Counter[int] = Counter()
    permanent: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()

    def session() -> None:
        while True:
            with lock:
                if not todo:
                    return
                n = todo.pop()
            body = message(args.tag, n, args.sender, args.recipient)
            while time.monotonic() - started < args.deadline:
                code, text = send_one(host, int(port), args.helo, args.sender,
                                      args.recipient, body)
                with lock:
                    if code == 250:
                        accepted.append(n)
                    elif code >= 500:
                        permanent.append(f"{n}: {code} {text}")
                    else:
                        temporary[code] += 1
                if code == 250 or code >= 500:
                    break
                time.sleep(1)

    threads = [threading.Thread(target=session) for _ in range(args.sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"accepted": sorted(accepted), "temporary": temporary,
                      "permanent": permanent, "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    main()
