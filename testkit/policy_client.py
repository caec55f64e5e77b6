"""A blocking policy-protocol client, speaking as Postfix's smtpd does."""

from __future__ import annotations

import socket
from typing import ClassVar

from secumail.protocols.policy import encode_request


def rcpt_request(**overrides: str) -> dict[str, str]:
    request = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "203.0.113.7",
        "client_name": "mail.remote.test",
        "reverse_client_name": "mail.remote.test",
        "helo_name": "mail.remote.test",
        "sender": "alice@remote.test",
        "recipient": "bob@secumail.test",
        "recipient_count": "0",
        "queue_id": "",
        "instance": "123.456.7",
        "size": "0",
        "sasl_method": "",
        "sasl_username": "",
    }
    request.update(overrides)
    return request


class PolicyClient:
    opened: ClassVar[list[PolicyClient]] = []

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        PolicyClient.opened.append(self)

    @classmethod
    def close_all(cls) -> None:
        """Called after each test (conftest), so no test leaks a socket."""
        while cls.opened:
            cls.opened.pop().close()

    def ask(self, request: dict[str, str]) -> str:
        """Send one request and return the action text (what follows `action=`)."""
        self.sock.sendall(encode_request(request))
        return self.read_answer()

    def read_answer(self) -> str:
        while b"\n\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("policy service closed the connection")
            self.buffer += data
        answer, _, self.buffer = self.buffer.partition(b"\n\n")
        text = answer.decode()
        assert text.startswith("action="), text
        return text.removeprefix("action=")

    def closed_by_peer(self) -> bool:
        """True when the service closed the connection (reads end of file)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
