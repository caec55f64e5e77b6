"""An SMTP sink the tests run in-process (aiosmtpd): the last hop, where mail is counted."""

from __future__ import annotations

import threading
import time
from email import message_from_bytes
from email.message import Message

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.processes import free_port


class SinkHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.arrived:
            self.messages.append((envelope, bytes(envelope.original_content or b"")))
            self.arrived.notify_all()
        return "250 2.0.0 Ok: stored"


class SmtpSink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self.handler.arrived:
            while len(self.handler.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.handler.messages)} of {count} messages arrived")
                self.handler.arrived.wait(left)
            return [message_from_bytes(raw) for _, raw in self.handler.messages]
