"""Mail the gateway writes itself (a held sender's notice, the users' digests), sent into
Postfix's re-injection port as the filters pass mail on.

Before queue, the DKIM milter sits on that port and takes the client a message names in
X-SecuMail-Client (only from the filters' network, where the gateway is) as its sender: the
gateway names itself a local submitter, so that its mail is signed as the site's own.
"""

from __future__ import annotations

from secumail.forwarded import HEADER as CLIENT_HEADER
from secumail.forwarded import ForwardedClient
from secumail.message import header_block
from secumail.netaddr import parse_ip
from secumail.protocols.smtp import Envelope, NextHop, SmtpReply, deliver
from secumail.settings import Settings


async def send_own_mail(settings: Settings, sender: str, recipient: str, message: bytes
                        ) -> SmtpReply:
    marked = message
    if settings.filter_mode == "before-queue":  # after queue, 10027 runs no milter to read it
        local = ForwardedClient(parse_ip("127.0.0.1"), settings.hostname, "ESMTP")
        marked = header_block([(CLIENT_HEADER, local.header_value())]) + message
    return await deliver(NextHop(settings.spamd_next_hop), settings.hostname,
                         Envelope(sender, (recipient,)), marked, settings.relay_timeout)
