"""A service's metrics listener (SECUMAIL_METRICS_LISTEN) under junk, driven through the
policy service's real socket. It was a thread per connection with no timeout (wsgiref):
idle sockets, each a thread, piled up for ever. Now it is served on the service's event
loop, one request per connection read within SECUMAIL_REQUEST_TIMEOUT, at most 64 at once.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from secumail.protocols.policy import encode_request
from testkit.processes import free_port, policy_env, scrape, start_policy


def ask(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_junk_idle_and_excess_connections_are_dropped_and_others_served(tmp_path: Path) -> None:
    port = free_port()
    policy = start_policy(policy_env(port, f"sqlite:///{tmp_path}/grey.sqlite",
                                     request_timeout="1"))
    metrics = policy.metrics_port
    try:
        offenders = [socket.create_connection(("127.0.0.1", metrics)) for _ in range(80)]
        offenders[0].sendall(bytes(range(256)) * 64)  # junk, and no end of request
        offenders[1].sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)  # endless header
        deadline = time.monotonic() + 10
        for sock in offenders:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert sock.recv(1) == b""  # closed: over the cap at once, the others after 1 s
            except ConnectionResetError:
                pass
            sock.close()
        assert policy.logged("too many connections")
        assert policy.logged("no answer within 1 s")
        # The listener and the service serve on.
        assert "secumail_policy" in scrape(metrics)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(encode_request({
                "request": "smtpd_access_policy", "protocol_state": "RCPT",
                "client_address": "192.0.2.7", "sender": "a@remote.test",
                "recipient": "b@secumail.test"}))
            assert client.recv(4096).startswith(b"action=")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/events?after=0",
                                    timeout=5) as response:
            events = json.loads(response.read())["events"]
        assert [row[4] for _, row in events] == ["a@remote.test"]
        assert ask(metrics, b"GET /events?after=x HTTP/1.1\r\n\r\n").startswith(
            b"HTTP/1.1 400 ")
        assert ask(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert ask(metrics, b"\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    finally:
        policy.stop()
