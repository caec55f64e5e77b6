"""Who really sent a message, as it travels behind the filters.

In before-queue mode the DKIM milter sits on the smtpd that takes mail back from the filters
(10027: Postfix shows a proxying smtpd's milters nothing), where the SMTP client is a filter.
The filters know the real client from Postfix's XFORWARD; the last one before 10027 writes
it in an `X-SecuMail-Client` header, after removing any such header already there (each
filter removes them, so a client cannot forge one), and the milter reads it only from a
connection out of the filters' network, then removes it. The same attributes tell a filter
whether the client was trusted (mynetworks, or authenticated: Postfix's protocol name then
ends in "A"), whose own mail may bounce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from secumail.netaddr import IPAddress, Network, parse_ip

HEADER = "X-SecuMail-Client"
_UNSAFE = re.compile(r"[^!-~]|[;\"\\]")
AUTHENTICATED = frozenset({"ESMTPA", "ESMTPSA"})


@dataclass(frozen=True)
class ForwardedClient:
    address: IPAddress | None
    helo: str
    protocol: str

    @property
    def authenticated(self) -> bool:
        return self.protocol.upper() in AUTHENTICATED

    def trusted(self, networks: list[Network]) -> bool:
        """One of our own users: authenticated, or from one of `networks` (mynetworks)."""
        return self.authenticated or (
            self.address is not None and any(self.address in net for net in networks))

    @classmethod
    def from_xforward(cls, xforward: dict[str, str]) -> ForwardedClient:
        return cls(parse_ip(xforward.get("ADDR", "")), xforward.get("HELO", ""),
                   xforward.get("PROTO", ""))

    def header_value(self) -> str:
        """`addr=...; helo=...; proto=...`, each value printable ASCII with no `;` or
        quote (what the client chose, its HELO name, is cleaned to that)."""
        fields = {"addr": str(self.address or "unknown"), "helo": self.helo or "unknown",
                  "proto": self.protocol or "unknown"}
        return "; ".join(f"{k}={_UNSAFE.sub('?', v)[:255]}" for k, v in fields.items())

    @classmethod
    def from_header(cls, value: str) -> ForwardedClient:
        fields = dict(item.strip().partition("=")[::2] for item in value.split(";"))
        return cls(parse_ip(fields.get("addr", "")), fields.get("helo", "").strip(),
                   fields.get("proto", "").strip())
