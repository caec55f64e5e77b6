"""Postfix policy delegation protocol, sans I/O (SMTPD_POLICY_README).

A request is `name=value` lines ended by an empty line; many requests share a connection;
the answer is one `action=...` line and an empty line. The decoder is fed whatever bytes
arrive, in any chunking, and hands back complete requests. Anything that is not a Postfix
request raises `PolicyProtocolError`: the server logs it and closes that connection.
"""

from __future__ import annotations

import asyncio
import re

from secumail.netaddr import parse_host_port

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
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0B, 0x20), 0x7F])

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
        end = buffer.rfind(b"\n") + 1  # complete lines end here
        rest = buffer[end:]
        if len(rest) > self.max_line:
            raise PolicyProtocolError(f"line longer than {self.max_line} bytes")
        self._buffer = rest
        if not end:
            return []
        raw = buffer[:end]
        # Control characters other than tab have no place here; CR only before LF.
        stray = len(raw) - len(raw.translate(None, _CONTROL_BYTES))
        if stray and stray != raw.count(b"\r\n"):
            raise PolicyProtocolError("control character in request")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyProtocolError("request is not UTF-8 text") from None
        if stray:
            text = text.replace("\r\n", "\n")
        lines = text[:-1].split("\n")
        if len(text) > self.max_line and max(map(len, lines)) > self.max_line:
            raise PolicyProtocolError(f"line longer than {self.max_line} bytes")
        requests: list[PolicyRequest] = []
        start = 0
        while True:
            try:
                stop = lines.index("", start)  # an empty line ends a request
            except ValueError:
                stop = len(lines)
            if stop > start:
                self._add(lines[start:stop])
            if stop == len(lines):
                return requests
            if not self._current:
                raise PolicyProtocolError("empty request")
            requests.append(self._current)
            self._current = {}
            start = stop + 1

    def _add(self, lines: list[str]) -> None:
        """Check a run of attribute lines and add them to the request being read.

        The checks run over the whole run at once (a comprehension, set operations), not
        line by line: a Python loop over a request's 30 lines cost as much as the decision.
        """
        pairs = [line.partition("=") for line in lines]
        attributes = {name: value for name, sep, value in pairs if sep}
        current = self._current
        if len(attributes) != len(pairs) or not current.keys().isdisjoint(attributes):
            seen = set(current)
            for name, sep, _ in pairs:
                if not sep:
                    raise PolicyProtocolError("line without '='")
                if name in seen:
                    raise PolicyProtocolError(f"attribute {name} given twice")
                seen.add(name)
        if not KNOWN_ATTRIBUTES.issuperset(attributes):
            unknown = sorted(attributes.keys() - KNOWN_ATTRIBUTES)
            if not all(map(_NAME.match, unknown)):
                raise PolicyProtocolError("malformed attribute name")
            if self.strict:
                raise PolicyProtocolError(f"unknown attribute {unknown[0]}")
        if len(current) + len(attributes) > self.max_attributes:
            raise PolicyProtocolError(f"more than {self.max_attributes} attributes")
        if current:
            current.update(attributes)
        else:
            self._current = attributes


def encode_action(action: str) -> bytes:
    """The answer to one request. Newlines in the text would end the answer early: drop them."""
    text = action.replace("\r", " ").replace("\n", " ")
    return b"action=" + text.encode("utf-8") + b"\n\n"


def encode_request(attributes: dict[str, str]) -> bytes:
    """A request as Postfix sends it (used by tests, benchmarks and the gateway's probe)."""
    body = "".join(f"{k}={v}\n" for k, v in attributes.items())
    return (body + "\n").encode("utf-8")


async def probe(address: str, timeout: float = 5.0) -> str:
    """A request at a stage no check acts on: a healthy service answers DUNNO."""
    target = parse_host_port(address)
    request = encode_request({"request": "smtpd_access_policy", "protocol_state": "VRFY"})
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(request)
            answer = (await reader.readuntil(b"\n\n")).decode(errors="replace").strip()
        finally:
            writer.close()
    if not answer.startswith("action="):
        raise ConnectionError(f"policy answered {answer[:80]!r}")
    return answer

