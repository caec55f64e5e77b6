"""An SMTP sink the tests run in-process (aiosmtpd): the last hop, where mail is counted."""

from __future__ import annotations

import asyncio
import threading
import time
from email import message_from_bytes
from email.message import Message

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from testkit.processes import free_port


class SinkHandler:
    """Stores what arrives. Recipients whose local part starts with `refuse` get 550, with
    `defer` 450: how the tests make a next hop answer differently per recipient. A message
    to a `slow...` recipient is stored at once and answered 3 s later (a slow next hop)."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []
        self.peers: list[object] = []  # the client's address for each message: its connection
        self.arrived = threading.Condition()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if address.startswith("refuse"):
            return "550 5.1.1 <" + address + ">: Recipient address rejected: no such user"
        if address.startswith("defer"):
            return "450 4.2.1 <" + address + ">: Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.arrived:
            self.messages.append((envelope, bytes(envelope.original_content or b"")))
            self.peers.append(session.peer)
            self.arrived.notify_all()
        if any(address.startswith("slow") for address in envelope.rcpt_tos):
            await asyncio.sleep(3)
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

    def restart(self) -> None:
        """Drop every connection and listen again on the same port, keeping what arrived."""
        self.controller.stop()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    @property
    def peers(self) -> list[object]:
        return self.handler.peers

    @property
    def envelopes(self) -> list[Envelope]:
        return [envelope for envelope, _ in self.handler.messages]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self.handler.arrived:
            while len(self.handler.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.handler.messages)} of {count} messages arrived")
                self.handler.arrived.wait(left)
            return [message_from_bytes(raw) for _, raw in self.handler.messages]
