"""Mail the gateway writes itself (a held sender's notice, the users' digests, our DMARC
reports), sent into Postfix's re-injection port as the filters pass mail on, DKIM-signed.

Before queue, the DKIM milter sits on that port and takes the client a message names in
X-SecuMail-Client (only from the filters' network, where the gateway is) as its sender: the
gateway names itself a local submitter, and the milter signs its mail as the site's own.
After queue, that port runs no milter: the gateway signs the message itself, with the
From domain's RSA key from the keys volume it shares with the milter (dkimpy).
"""

from __future__ import annotations

import logging
from email.utils import parseaddr

import dkim
from cryptography.hazmat.primitives import serialization

from secumail.dkim_keys import KeyStore
from secumail.forwarded import HEADER as CLIENT_HEADER
from secumail.forwarded import ForwardedClient
from secumail.logs import log_event
from secumail.message import header_block, header_block_end
from secumail.netaddr import parse_ip
from secumail.protocols.smtp import Envelope, NextHop, SmtpReply, deliver
from secumail.settings import Settings

log = logging.getLogger("secumail.gateway")

SIGNED = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
          b"content-type", b"auto-submitted")


def prepared(settings: Settings, message: bytes, keys: KeyStore | None = None) -> bytes:
    """The message as it goes to the re-injection port: marked as a local submission
    (before queue), or signed here (after queue)."""
    if settings.filter_mode == "before-queue":
        local = ForwardedClient(parse_ip("127.0.0.1"), settings.hostname, "ESMTP")
        return header_block([(CLIENT_HEADER, local.header_value())]) + message
    return signed(settings, message, keys or KeyStore(settings.dkim_keys_dir))


def signed(settings: Settings, message: bytes, keys: KeyStore) -> bytes:
    """`message` with a DKIM-Signature of its From domain's RSA key; unsigned (and said in
    the log) when the domain has none."""
    head = message[:header_block_end(message)].decode("utf-8", "replace")
    from_line = next((line for line in head.splitlines() if line.lower().startswith("from:")),
                     "")
    domain = parseaddr(from_line[5:])[1].rpartition("@")[2].lower()
    found = keys.lookup(domain) if domain else None
    rsa = [k for k in found.keys if k.key_type == "rsa"] if found else []
    if not rsa:
        log_event(log, "own mail sent unsigned: no RSA key for its domain", logging.WARNING,
                  domain=domain or "?")
        return message
    key = rsa[0]
    pem = key.private_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # as it will travel
    signature = dkim.sign(message, key.selector.encode(), key.domain.encode(), pem,
                          canonicalize=(b"relaxed", b"relaxed"), include_headers=list(SIGNED))
    return bytes(signature) + message


async def send_own_mail(settings: Settings, sender: str, recipient: str, message: bytes
                        ) -> SmtpReply:
    return await deliver(NextHop(settings.spamd_next_hop), settings.hostname,
                         Envelope(sender, (recipient,)), prepared(settings, message),
                         settings.relay_timeout)
