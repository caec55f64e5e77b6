"""Junk against one listener, run inside the compose network (the gateway's container holds
every network and SecuMail's probes): `python - HOST PORT PROBE` with this file on stdin.

Sends binary garbage, endless lines and half-closed requests on many connections, holds
many idle connections open meanwhile, probes the service while they are open, and prints
what happened as JSON. Standard library and secumail.probes only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from secumail import probes

HOST, PORT, PROBE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
IDLE, GARBAGE, ENDLESS, HALF_CLOSED = int(sys.argv[4]), 20, 3, 20
WAIT = float(sys.argv[5])  # seconds the service has to hang up on an offender


KEPT_OPEN: list[str] = []  # what each connection the service did not drop had received


def hung_up(sock: socket.socket) -> bool:
    """Whether the service closes the connection (whatever it answers first) in time."""
    sock.settimeout(WAIT)
    received = b""
    started = time.monotonic()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        KEPT_OPEN.append(f"open after {time.monotonic() - started:.1f} s, "
                         f"{sock.getsockname()} got {received[-300:]!r}")
        return False
    except OSError:
        pass  # reset: hung up too
    return True


def garbage(_: int) -> bool:
    with socket.create_connection((HOST, PORT), timeout=WAIT) as sock:
        try:
            for _ in range(64):
                sock.sendall(bytes(range(256)) * 16 + b"\r\n")
        except OSError:
            return True
        return hung_up(sock)


def endless_line(_: int) -> bool:
    with socket.create_connection((HOST, PORT), timeout=WAIT) as sock:
        try:
            for _ in range(256):  # 16 MiB without a line end
                sock.sendall(b"A" * 65536)
        except OSError:
            return True
        return hung_up(sock)


def half_closed(_: int) -> bool:
    with socket.create_connection((HOST, PORT), timeout=WAIT) as sock:
        try:
            sock.sendall(b"EHLO half.example\r\nMAIL FROM:<half@exam")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return True
        return hung_up(sock)


def main() -> None:
    idle = [socket.create_connection((HOST, PORT), timeout=WAIT) for _ in range(IDLE)]
    with ThreadPoolExecutor(16) as pool:
        report = {
            "garbage dropped": sum(pool.map(garbage, range(GARBAGE))),
            "endless lines dropped": sum(pool.map(endless_line, range(ENDLESS))),
            "half-closed dropped": sum(pool.map(half_closed, range(HALF_CLOSED))),
        }
    started = time.monotonic()
    try:
        asyncio.run(probes.PROBES[PROBE][0](f"{HOST}:{PORT}", 5.0))
        report["probe with idle connections open"] = "ok"
    except probes.PROBE_ERRORS as error:
        report["probe with idle connections open"] = f"failed: {error!r}"
    report["probe seconds"] = round(time.monotonic() - started, 3)
    for sock in idle:
        sock.close()
    if KEPT_OPEN:
        report["kept open"] = KEPT_OPEN
    print(json.dumps(report))


main()
