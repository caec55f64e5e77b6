"""aiosmtpd, as a content filter's SMTP server: the one module that knows aiosmtpd's insides.

aiosmtpd (pinned in pyproject.toml) reads the client's commands, answers EHLO, NOOP, RSET,
QUIT and the syntax errors, and keeps the idle timeout. What a filter needs and aiosmtpd
lacks is added here, and every use of an aiosmtpd member that is not its public API is in
this file, pinned by tests/unit/test_aiosmtpd_adapter.py (an aiosmtpd upgrade that changes
one fails there first):
- the client check before the greeting (`_handle_client`);
- MAIL and RCPT with the parameters a relay passes on (DSN's RET, ENVID, NOTIFY, ORCPT,
  which aiosmtpd refuses), read with `_strip_command_keyword` and, past the plain
  `<local@domain>` Postfix sends, `_getaddr`;
- DATA read in chunks from `_reader` (aiosmtpd kept an object per line: 400 MB for 10 MB
  of empty lines, and refused lines over 1,000 bytes that Postfix passes on), what the
  client pipelined after the final dot put back into the reader's buffer;
- XFORWARD (Postfix's XFORWARD_README);
- a cap on a line that never ends, and the connection count;
- replies to pipelined commands written together (`_reply`, reading `_reader._buffer`).

The commands go straight to the session (secumail/filter/session.py), with the null sender
spelled "" as everywhere else; aiosmtpd's own envelope is not used.
"""

from __future__ import annotations

import asyncio
import logging
import re
from inspect import signature
from typing import Any, ClassVar, cast

from aiosmtpd.smtp import SMTP, Session, syntax

from secumail.filter.session import Filter, FilterSession
from secumail.filter.verdicts import TEMPFAIL_INTERNAL
from secumail.limits import READ_SIZE, UNENDING_LINE
from secumail.logs import log_event
from secumail.netaddr import peer_name
from secumail.protocols.smtp import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    XFORWARD_NAMES,
    DotDecoder,
    parameter_problem,
)

log = logging.getLogger("secumail.filter")

# The address Postfix sends, read without aiosmtpd's parser (`_getaddr`, which parses with
# `email`'s header parser: a tenth of a filter's time).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*")


class _HooksListedOnce:
    """aiosmtpd finds the server's commands and the handler's hooks with dir() and getattr()
    on both at every new connection: a sixth of a filter's time, with one connection per
    message. Those are names of the class, so dir() lists them once per class."""

    _names: ClassVar[dict[type, list[str]]] = {}

    def __dir__(self) -> list[str]:
        names = self._names.get(type(self))
        if names is None:
            prefixes = ("smtp_", "auth_", "handle_")
            names = [name for name in dir(type(self)) if name.startswith(prefixes)]
            self._names[type(self)] = names
        return names


class SessionHooks(_HooksListedOnce):
    """aiosmtpd's handler (its public hook API) for one session: EHLO's extensions, RSET,
    and a bug's reply."""

    def __init__(self, session: FilterSession) -> None:
        self.session = session

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: object,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands line by line, so a client may send them in groups
        # (RFC 2920): Postfix then sends MAIL, RCPT and DATA in one packet.
        ours = ["250-PIPELINING", "250-DSN", "250-XFORWARD " + " ".join(XFORWARD_NAMES)]
        return [*responses[:-1], *ours, responses[-1]]

    async def handle_RSET(self, server: SMTP, session: Session, envelope: object) -> str:
        await self.session.rset()
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """A bug must not bounce mail: aiosmtpd would say 500; say 451 so Postfix retries."""
        log.error("filter %s: internal error", self.session.filter.name, exc_info=error)
        return TEMPFAIL_INTERNAL


# aiosmtpd reads handle_EHLO's signature at every connection (to tell its old 4-argument form
# from the 5-argument one), a third of a new connection's cost; inspect.signature() returns a
# function's __signature__ as it is, so it is worked out once, here.
setattr(SessionHooks.handle_EHLO, "__signature__", signature(SessionHooks.handle_EHLO))  # noqa: B010


class FilterSMTP(_HooksListedOnce, SMTP):
    """One client connection of a content filter, its commands handed to a FilterSession."""

    def __init__(self, filter: Filter, **kwargs: Any) -> None:
        self.filter = filter
        self.relay: FilterSession | None = filter.open_session()
        super().__init__(SessionHooks(self.relay) if self.relay else _NO_SESSION, **kwargs)
        self._unterminated = 0  # bytes received since the last line end
        self._held: list[bytes] = []  # replies to pipelined commands, not yet written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.relay is None:  # over the cap, or draining
            cast(asyncio.Transport, transport).write(
                b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        assert self.session is not None and self.transport is not None
        peer = self.session.peer
        refusal = await self.filter.refusal(peer[0] if isinstance(peer, tuple) else "")
        if refusal is not None:
            await self.push(refusal)
            self.transport.close()
            return
        await super()._handle_client()

    # --- the commands aiosmtpd lacks or refuses --------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL with the parameters a relay must pass on (DSN's RET and ENVID as well as
        BODY, SMTPUTF8, SIZE), their values in their own case."""
        await self._envelope_command("MAIL", arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT with DSN's NOTIFY and ORCPT, passed on."""
        await self._envelope_command("RCPT", arg)

    async def _envelope_command(self, verb: str, arg: str | None) -> None:
        relay = self.relay
        if await self.check_helo_needed() or await self.check_auth_needed(verb):
            return
        assert relay is not None
        keyword = "FROM:" if verb == "MAIL" else "TO:"
        if verb == "MAIL" and relay.envelope is not None:
            await self.push("503 Error: nested MAIL command")
            return
        if verb == "RCPT" and relay.envelope is None:
            await self.push("503 Error: need MAIL command")
            return
        address, parameters = self._address_and_parameters(keyword, arg or "")
        if address is None:
            await self.push(parameters[0])
            return
        known = MAIL_PARAMETERS if verb == "MAIL" else RCPT_PARAMETERS
        problem = parameter_problem(parameters, known, self.data_size_limit)
        if problem is not None:
            await self.push(problem)
            return
        if verb == "MAIL":
            reply = await relay.mail("" if address == "<>" else address, parameters)
        else:
            reply = await relay.rcpt(address, parameters)
        await self._reply(reply, pipelined=True)

    def _address_and_parameters(self, keyword: str, arg: str) -> tuple[str | None, list[str]]:
        """The address and parameters of MAIL or RCPT; (None, [the reply]) when malformed."""
        refusal = f"501 Syntax: {'MAIL' if keyword == 'FROM:' else 'RCPT'} {keyword} " \
            "<address> [SP <parameters>]"
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return None, [refusal]
        address, rest = self._getaddr(stripped)
        if address is None:
            return None, ["553 5.1.3 Error: malformed address"]
        if not address:
            return None, [refusal]
        return address, (rest or "").split()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of an address, with a quick path for the plain
        `<local@domain>` Postfix sends."""
        plain = PLAIN_ADDRESS.match(arg)
        if plain is None or (self.local_part_limit
                             and len(plain[1].rpartition("@")[0]) > self.local_part_limit):
            return SMTP._getaddr(self, arg)
        return plain[1], arg[plain.end():]

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in chunks (DotDecoder), not line by line; commands pipelined after the
        final dot go back to the reader."""
        relay = self.relay
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert relay is not None
        if relay.envelope is None or not relay.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        decoder = DotDecoder(self.data_size_limit)
        while not decoder.done:
            chunk = await self._reader.read(READ_SIZE)
            if not chunk:
                return  # the client left mid-message: nothing to answer
            decoder.feed(chunk)
        if decoder.rest:
            cast(Any, self._reader)._buffer[:0] = decoder.rest
        if decoder.too_big:
            await relay.rset()  # the next hop holds the transaction open: cancelled
            await self.push("552 5.3.4 Message too big for this system")
            return
        await self.push(await relay.data(decoder.message()))

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's client attributes (XFORWARD_README), passed on to the next hop."""
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value ...")
            return
        attributes = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in XFORWARD_NAMES or len(value) > 255:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute {name[:32]!r}")
                return
            attributes[name.upper()] = value
        assert self.relay is not None
        self.relay.xforward(attributes)
        await self._reply("250 2.0.0 Ok", pipelined=True)

    # --- the connection ----------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Every reply aiosmtpd writes, and ours: written now, after any held back."""
        await self._reply(status, pipelined=False)

    async def _reply(self, status: str | bytes, pipelined: bool) -> None:
        """A reply. Those to MAIL, RCPT and XFORWARD (`pipelined`), which a client may send
        in a group (RFC 2920: Postfix sends MAIL, RCPT and DATA at once), wait while a whole
        command is left unread, and go out with the next reply, in one write: each write
        costs a system call and a wake-up of the client. Any other reply (354, the end of
        DATA, an error, a goodbye before the connection closes) is written at once."""
        self._held.append((status.encode() if isinstance(status, str) else status) + b"\r\n")
        if pipelined and b"\n" in cast(Any, self._reader)._buffer:
            return
        held, self._held = b"".join(self._held), []
        self._writer.write(held)
        await self._writer.drain()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        end = data.rfind(b"\n")
        self._unterminated = len(data) - end - 1 if end >= 0 else self._unterminated + len(data)
        if self._unterminated > UNENDING_LINE:
            log_event(log, "connection dropped", logging.WARNING, filter=self.filter.name,
                      peer=peer_name(self.session.peer if self.session else None),
                      reason=f"no line end in {UNENDING_LINE} bytes")
            cast(asyncio.Transport, self.transport).write(
                b"500 5.5.2 Line too long, closing connection\r\n")
            self.transport.close()
            return
        if self.relay is not None:
            self.relay.client_spoke()  # it is still there after our reply
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.closed(reset=isinstance(error, ConnectionResetError))
            super().connection_lost(error)


class _NoSession(_HooksListedOnce):
    """The handler of a connection refused at once (FilterSMTP.connection_made)."""


_NO_SESSION = _NoSession()
