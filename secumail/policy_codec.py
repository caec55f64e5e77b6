"""Postfix policy delegation protocol, sans I/O (SMTPD_POLICY_README).

A request is `name=value` lines ended by an empty line; many requests share a connection;
the answer is one `action=...` line and an empty line. The decoder is fed whatever bytes
arrive, in any chunking, and hands back complete requests. Anything that is not a Postfix
request raises `PolicyProtocolError`: the server logs it and closes that connection.
"""

from __future__ import annotations

import re

# Every attribute Postfix (up to 3.10) sends in a policy request.
KNOWN_ATTRIBUTES = frozenset(
    """
    request protocol_state protocol_name helo_name queue_id sender recipient recipient_count
    client_address client_name reverse_client_name client_port instance sasl_method
    sasl_username sasl_sender size ccert_subject ccert_issuer ccert_fingerprint
    ccert_pubkey_fingerprint encryption_protocol encryption_cipher encryption_keysize
    etrn_domain stress policy_context server_address server_port compatibility_level
    mail_version
    """.split()
)

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
# Control characters other than tab (and the newlines between lines) have no place here.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

PolicyRequest = dict[str, str]


class PolicyProtocolError(Exception):
    """The peer sent something that is not a policy request."""


class PolicyDecoder:
    """Accumulates bytes and yields complete requests, with bounded memory."""

    def __init__(self, max_line: int = 2048, max_attributes: int = 64, strict: bool = True):
        self.max_line = max_line
        self.max_attributes = max_attributes
        self.strict = strict
        self._buffer = b""
        self._current: PolicyRequest = {}

    @property
    def pending(self) -> bool:
        """True while a request has started but not ended (a half-sent request)."""
        return bool(self._buffer or self._current)

    def feed(self, data: bytes) -> list[PolicyRequest]:
        buffer = self._buffer + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > self.max_line:
            raise PolicyProtocolError(f"line longer than {self.max_line} bytes")
        self._buffer = rest
        if not lines:
            return []
        try:
            # Each line keeps its \n until CRLF is folded, so a CR before any newline goes too.
            text = (b"\n".join(lines) + b"\n").decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            raise PolicyProtocolError("request is not UTF-8 text") from None
        # One scan of the whole chunk for control characters (cheaper than one per line).
        if _CONTROL.search(text):
            raise PolicyProtocolError("control character in request")
        requests = []
        current = self._current
        for line in text.split("\n")[:-1]:
            if not line:
                if not current:
                    raise PolicyProtocolError("empty request")
                requests.append(current)
                current = self._current = {}
                continue
            if len(line) > self.max_line:
                raise PolicyProtocolError(f"line longer than {self.max_line} bytes")
            name, sep, value = line.partition("=")
            if not sep:
                raise PolicyProtocolError("line without '='")
            if name not in KNOWN_ATTRIBUTES:
                if not _NAME.match(name):
                    raise PolicyProtocolError("malformed attribute name")
                if self.strict:
                    raise PolicyProtocolError(f"unknown attribute {name}")
            if name in current:
                raise PolicyProtocolError(f"attribute {name} given twice")
            if len(current) >= self.max_attributes:
                raise PolicyProtocolError(f"more than {self.max_attributes} attributes")
            current[name] = value
        return requests


def encode_action(action: str) -> bytes:
    """The answer to one request. Newlines in the text would end the answer early: drop them."""
    text = action.replace("\r", " ").replace("\n", " ")
    return b"action=" + text.encode("utf-8") + b"\n\n"


def encode_request(attributes: dict[str, str]) -> bytes:
    """A request as Postfix sends it (used by tests, benchmarks and the gateway's probe)."""
    body = "".join(f"{k}={v}\n" for k, v in attributes.items())
    return (body + "\n").encode("utf-8")
