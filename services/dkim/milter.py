"""One milter connection: commands in, replies out, DKIM and DMARC decisions in between.

The session is I/O-free except for the DNS lookups at end of message (awaited): the server
feeds it decoded commands and writes back the bytes it returns.

Options negotiated with the MTA (when offered): add and change headers; skip RCPT, DATA
and unknown commands; send no reply to connect, HELO, MAIL, headers, end of headers and
body chunks (Postfix then streams the whole message without waiting); header values with
their leading space, so that simple canonicalisation sees the exact bytes.

Mail from SECUMAIL_MYNETWORKS or from an authenticated client ({auth_authen}) whose From
domain has a key is signed; everything else is verified and gets Authentication-Results.
Nothing the client wrote is trusted: every Authentication-Results that claims to be ours is
removed whatever the message, and the SPF result DMARC uses is the one this milter computes
for the client's address, HELO and MAIL FROM (never a Received-SPF header, which the client
may have written itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from secumail import dmarc, tracking
from secumail.dkim_keys import KeyStore, SigningKey
from secumail.dmarc_reports import Check, Published, Tally
from secumail.dns import DnsTemporaryError
from secumail.forwarded import HEADER as FORWARDED_NAME
from secumail.forwarded import ForwardedClient
from secumail.logs import log_event
from secumail.message import check_header_value
from secumail.netaddr import IPAddress, parse_ip
from secumail.protocols import milter as mc
from secumail.settings import Settings
from services.dkim import arc, auth_results, own_domain, signature
from services.dkim.canonical import RELAXED, BodyHasher, field_name, header_value_crlf

log = logging.getLogger("secumail.dkim")

WANTED_ACTIONS = mc.ACTION_ADD_HEADERS | mc.ACTION_CHANGE_HEADERS
WANTED_PROTOCOL = (
    mc.NO_RCPT | mc.NO_DATA | mc.NO_UNKNOWN
    | mc.NO_REPLY_CONNECT | mc.NO_REPLY_HELO | mc.NO_REPLY_MAIL | mc.NO_REPLY_HEADER
    | mc.NO_REPLY_EOH | mc.NO_REPLY_BODY | mc.HEADER_LEADING_SPACE
)
WANTED_MACROS = {mc.STAGE_MAIL: "{auth_authen}", mc.STAGE_EOM: "i"}

# Bounds on what one message may make the milter hold or do. Postfix bounds the size of one
# header field, not their number: a message over these is refused (552), never let through
# unchecked with whatever results it claims.
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADERS = 2000
MAX_SIGNATURES = 10
TOO_BIG = (f"552 5.6.0 Message header block too large (over {MAX_HEADERS} fields or "
           f"{MAX_HEADER_BYTES} bytes)")

AUTH_RESULTS = b"Authentication-Results"
WARNING_HEADER = own_domain.WARNING_HEADER.encode()
FORWARDED_HEADER = FORWARDED_NAME.encode()
FORWARDED = FORWARDED_HEADER.lower()
_SIGN_BODY = (RELAXED, "sha256", None)

TxtLookup = Callable[[str], Awaitable[list[str] | None]]
# (client address, MAIL FROM without brackets, HELO name) -> the SPF result (RFC 7208 2.6).
SpfCheck = Callable[[str, str, str], Awaitable[str]]


@dataclass
class Outcome:
    """What happened to one message: for the log line, the metrics and the tests."""

    mode: str  # sign, verify, skip, error
    action: str  # continue, tempfail, reject
    reason: str = ""
    fields: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0  # from end of message to the answer


class DkimMilter:
    """What every connection shares: settings, keys, the DNS lookup, the clock."""

    def __init__(self, settings: Settings, keys: KeyStore, lookup: TxtLookup,
                 spf_check: SpfCheck | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.keys = keys
        self.lookup = lookup
        # None: no SPF result for DMARC (SECUMAIL_SPF_ENABLED=false); it then rests on DKIM.
        self.spf_check = spf_check if settings.spf_enabled else None
        # Each DMARC check counted for the aggregate reports, when they are on.
        self.tally: Tally | None = Tally() if settings.dmarc_reports else None
        self.clock = clock
        self.authserv_id = settings.authserv_id or settings.hostname or socket.gethostname()
        self.allowed_outsiders = own_domain.AllowedOutsiders.from_lists(
            settings.own_domain_allowed_senders, settings.own_domain_allowed_networks)
        self.arc_trusted = frozenset(settings.arc_trusted_sealers)
        # Sealing needs the envelope recipients: only then does Postfix send them (RCPT).
        self.arc_seal_domains = frozenset(settings.arc_seal_domains)
        self.protocol = (WANTED_PROTOCOL & ~mc.NO_RCPT) | mc.NO_REPLY_RCPT \
            if self.arc_seal_domains else WANTED_PROTOCOL
        self.on_outcome: Callable[[Outcome], None] | None = None

    def session(self, peer: str = "?") -> MilterSession:
        return MilterSession(self, peer)


class MilterSession:
    def __init__(self, milter: DkimMilter, peer: str) -> None:
        self.milter = milter
        self.settings = milter.settings
        self.peer = peer
        self.negotiated: mc.Negotiated | None = None
        self.leading_space = False
        self._header_reply = self._body_reply = b""
        self.client_ip: IPAddress | None = None
        self.client = ""
        self.helo = ""
        self.connection_macros: dict[str, str] = {}
        self._new_message()

    # --- state ------------------------------------------------------------------------------

    def _new_message(self) -> None:
        self.macros: dict[str, str] = {}
        # The real client, when a filter says who it was (before-queue mode): see _origin.
        self.forwarded: ForwardedClient | None = None
        self.sender = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.field_names: list[bytes] = []  # each header's name as compared, worked out once
        self.header_count = 0
        self.header_bytes = 0
        self.too_big = False
        self.mode = ""
        self.skip_reason = ""
        self.hashers: dict[tuple[str, str, int | None], BodyHasher] = {}
        self.sign_keys: list[SigningKey] = []
        self.parsed: list[signature.ParsedSignature | tuple[signature.SignatureInfo, str]] = []
        # The ARC chain, or why its structure fails (both None: no ARC field).
        self.arc_chain: arc.Chain | None = None
        self.arc_error: str | None = None
        self.recipients: list[str] = []  # only when sealing (SECUMAIL_ARC_SEAL_DOMAINS)
        self.seal_key: SigningKey | None = None
        self.in_message = False

    @property
    def queue_id(self) -> str:
        return self.macros.get("i") or self.connection_macros.get("i", "")

    # --- commands before end of message -----------------------------------------------------

    def handle(self, command: mc.Command) -> bytes:
        """Everything but EndOfMessage: returns the bytes to send (often none)."""
        if isinstance(command, mc.OptionNegotiation):
            self.negotiated = mc.negotiate(command, WANTED_ACTIONS, self.milter.protocol,
                                           WANTED_MACROS)
            self.leading_space = self.negotiated.header_leading_space
            # The two commands of every message line, answered without a lookup.
            self._header_reply = (mc.CONTINUE if self.negotiated.needs_reply(
                mc.Header(b"x", b"")) else b"")
            self._body_reply = (mc.CONTINUE if self.negotiated.needs_reply(
                mc.BodyChunk(b"")) else b"")
            return self.negotiated.reply
        negotiated = self.negotiated
        if negotiated is None:
            raise mc.MilterProtocolError(f"{type(command).__name__} before option negotiation")
        if isinstance(command, mc.Header):
            self._header(command)
            return self._header_reply
        if isinstance(command, mc.BodyChunk):
            for hasher in self.hashers.values():
                hasher.update(command.data)
            return self._body_reply
        if isinstance(command, mc.DefineMacros):
            target = self.connection_macros if command.stage in (b"C", b"H") else self.macros
            target.update(command.macros)
        elif isinstance(command, mc.EndOfHeaders):
            self._decide()
        elif isinstance(command, mc.MailFrom):
            if self.in_message:
                self._new_message()
            self.in_message = True
            self.sender = command.sender.strip().removeprefix("<").removesuffix(">")
        elif isinstance(command, mc.RcptTo):
            self.recipients.append(command.recipient.strip().strip("<>").lower())
        elif isinstance(command, mc.Helo):
            self.helo = command.name
        elif isinstance(command, mc.Connect):
            self.client = f"{command.hostname}[{command.address}]"
            self.client_ip = parse_ip(command.address) if command.family in "46" else None
        elif isinstance(command, mc.Abort):
            self._new_message()
        elif isinstance(command, mc.QuitNewConnection):
            self._new_message()
            self.connection_macros = {}
            self.client_ip, self.client, self.helo = None, "", ""
        return mc.CONTINUE if negotiated.needs_reply(command) else b""

    def _header(self, command: mc.Header) -> None:
        self.in_message = True
        self.header_count += 1
        self.header_bytes += len(command.name) + len(command.value) + 3
        if self.header_bytes > MAX_HEADER_BYTES or self.header_count > MAX_HEADERS:
            self.too_big = True  # refused at end of message; nothing more is kept
            return
        value = command.value if self.leading_space else b" " + command.value
        self.headers.append((command.name, header_value_crlf(value)))
        self.field_names.append(field_name(command.name))

    def _header_values(self, name: bytes) -> list[bytes]:
        return [v for (_, v), n in zip(self.headers, self.field_names, strict=True)
                if n == name]

    def _origin(self) -> ForwardedClient:
        """The client that sent this message. In before-queue mode the milter sits behind the
        filters (secumail/forwarded.py): from a connection out of the filters' network, the
        real client is the one their X-SecuMail-Client header names (none: unknown)."""
        if self.forwarded is not None:
            return self.forwarded
        authenticated = bool(self.macros.get("auth_authen")
                             or self.connection_macros.get("auth_authen"))
        return ForwardedClient(self.client_ip, self.helo, "ESMTPA" if authenticated else "")

    def _internal(self) -> bool:
        return self._origin().trusted(self.settings.trusted_networks)

    def _decide(self) -> None:
        """At end of headers: sign, verify or let pass, and set up the body hashers."""
        if self.too_big:
            self.mode = "refuse"
            return
        if (self.settings.filter_mode == "before-queue" and self.client_ip is not None
                and self.client_ip in self.settings.filter_subnet):
            named = self._header_values(FORWARDED)
            self.forwarded = (ForwardedClient.from_header(_text(named[0])) if named
                              else ForwardedClient(None, "", ""))
        if self._internal():
            self._decide_signing()
        else:
            self._decide_verifying()

    def _decide_signing(self) -> None:
        domains = dmarc.from_domains([_text(v) for v in self._header_values(b"from")])
        if not domains:
            self.mode, self.skip_reason = "skip", "no From address to sign for"
            return
        found = self.milter.keys.lookup(domains[0])
        if found is None:
            self.mode, self.skip_reason = "skip", f"no key for {domains[0]}"
        elif found.error:
            self.mode, self.skip_reason = "error", f"key for {domains[0]} unusable: {found.error}"
        else:
            self.mode = "sign"
            self.sign_keys = found.keys
            self.hashers[_SIGN_BODY] = BodyHasher(RELAXED, "sha256")

    def _decide_verifying(self) -> None:
        self.mode = "verify"
        for (name, value), lowered in zip(self.headers, self.field_names, strict=True):
            if lowered != b"dkim-signature":
                continue
            if len(self.parsed) >= MAX_SIGNATURES:
                log_event(log, "signatures over the limit not verified", logging.WARNING,
                          queue_id=self.queue_id, limit=MAX_SIGNATURES)
                break
            try:
                parsed = signature.parse_signature(value, name)
            except signature.SignatureSyntaxError as error:
                self.parsed.append((signature.signature_fields(value), str(error)))
                continue
            self.parsed.append(parsed)
            key = parsed.body_hasher_key
            if key not in self.hashers:
                self.hashers[key] = BodyHasher(*key)
        try:
            self.arc_chain = arc.collect(self.headers)
        except arc.ChainError as error:
            self.arc_error = str(error)
        if self.arc_chain is not None:
            for parsed_ams in self.arc_chain.signatures:
                if parsed_ams is not None and parsed_ams.body_hasher_key not in self.hashers:
                    self.hashers[parsed_ams.body_hasher_key] = BodyHasher(
                        *parsed_ams.body_hasher_key)
        self.seal_key = self._seal_key()
        if self.seal_key is not None and _SIGN_BODY not in self.hashers:
            self.hashers[_SIGN_BODY] = BodyHasher(RELAXED, "sha256")

    def _seal_key(self) -> SigningKey | None:
        """The key to ARC-seal this message with: the RSA key of the first recipient domain
        in SECUMAIL_ARC_SEAL_DOMAINS that has one (mail we forward); None otherwise."""
        for recipient in self.recipients:
            domain = recipient.rpartition("@")[2]
            if domain not in self.milter.arc_seal_domains:
                continue
            found = self.milter.keys.lookup(domain)
            rsa = [k for k in found.keys if k.key_type == "rsa"] if found else []
            if rsa:
                return rsa[0]
        return None

    # --- end of message ---------------------------------------------------------------------

    async def end_of_message(self, command: mc.EndOfMessage) -> bytes:
        started = time.perf_counter()
        if command.data:
            for hasher in self.hashers.values():
                hasher.update(command.data)
        if not self.mode or self.too_big:  # no end of headers seen, or headers after it
            self._decide()
        try:
            async with asyncio.timeout(self.settings.dkim_answer_timeout):
                reply, outcome = await self._answer()
        except TimeoutError:
            reply, outcome = self._failure(
                self.mode, f"no answer within {self.settings.dkim_answer_timeout:g} s")
        except Exception as error:
            log.exception("end of message failed")
            reply, outcome = self._failure(self.mode, f"internal error: {error!r}")
        if outcome.action == "continue":
            # Whatever else happened, no Authentication-Results of ours but our own leaves,
            # no X-SecuMail-Client (it was for this milter only), no warning of ours but ours.
            forged = self._forged_auth_results()
            if forged:
                outcome.fields["removed_forged_auth_results"] = len(forged)
            removals = [mc.encode_change_header(index, AUTH_RESULTS, b"")
                        for index in reversed(forged)]
            forwarded = len(self._header_values(FORWARDED))
            removals += [mc.encode_change_header(index, FORWARDED_HEADER, b"")
                         for index in range(forwarded, 0, -1)]
            if self.mode == "verify":  # our warning is ours only (signed mail keeps its own)
                warnings = len(self._header_values(WARNING_HEADER.lower()))
                removals += [mc.encode_change_header(index, WARNING_HEADER, b"")
                             for index in range(warnings, 0, -1)]
            reply = b"".join(removals) + reply
        outcome.seconds = time.perf_counter() - started
        outcome.fields["ms"] = round(outcome.seconds * 1000, 2)
        self._log(outcome)
        self._new_message()
        return reply

    async def _answer(self) -> tuple[bytes, Outcome]:
        if self.mode == "refuse":
            return mc.encode_reply_code(TOO_BIG), Outcome(
                "verify", "reject", "header block over the limits",
                {"fields": self.header_count, "bytes": self.header_bytes})
        if self.mode == "sign":
            return self._sign()
        if self.mode == "verify":
            return await self._verify()
        if self.mode == "error":
            return self._failure("sign", self.skip_reason)
        return mc.CONTINUE, Outcome("skip", "continue", self.skip_reason)

    def _failure(self, mode: str, reason: str) -> tuple[bytes, Outcome]:
        """Signing or verifying could not be done: defer, or let the mail through as is."""
        if self.settings.dkim_fail_open:
            return mc.CONTINUE, Outcome(mode, "continue", reason + " (fail open)")
        text = "451 4.7.5 " + ("DKIM signing" if mode == "sign" else "DKIM")
        reply = mc.encode_reply_code(text + " temporarily unavailable, try again later")
        return reply, Outcome(mode, "tempfail", reason)

    def _header_bytes(self, name: bytes, value: bytes) -> tuple[bytes, bytes]:
        """A header as the MTA wants it: \\n line ends; a leading space only if negotiated.
        A line break that is no fold is refused: it would start a header of its own."""
        check_header_value(value.decode("utf-8", "replace"))
        value = value.replace(b"\r\n", b"\n").lstrip(b" ")
        return name, (b" " + value if self.leading_space else value)

    def _sign(self) -> tuple[bytes, Outcome]:
        body_hash = self.hashers[_SIGN_BODY].digest()
        timestamp = int(self.milter.clock())
        replies = []
        # Inserted at the top one after the other: the last one inserted ends up first.
        for key in reversed(self.sign_keys):
            value = signature.sign(self.headers, body_hash, key, timestamp)
            replies.append(mc.encode_insert_header(
                0, *self._header_bytes(signature.SIGNATURE_HEADER, value)))
        replies.append(mc.CONTINUE)
        outcome = Outcome("sign", "continue", fields={
            "domain": self.sign_keys[0].domain,
            "selectors": ",".join(f"{k.selector}/{k.key_type}" for k in self.sign_keys),
        })
        return b"".join(replies), outcome

    async def _verify(self) -> tuple[bytes, Outcome]:
        try:
            from_domain = dmarc.author_domain([_text(v) for v in self._header_values(b"from")])
        except dmarc.AuthorError as error:
            reply = mc.encode_reply_code(
                f"550 5.7.1 Message refused: {error} (RFC 5322 3.6.2, RFC 7489 6.6.1)")
            return reply, Outcome("verify", "reject", str(error))
        lookup = self.milter.lookup
        hashes = {key: (hasher.digest(), hasher.total) for key, hasher in self.hashers.items()}
        parsed = [p for p in self.parsed if isinstance(p, signature.ParsedSignature)]
        arc_keys = self.arc_chain.key_names if self.arc_chain is not None else []
        key_names = list(dict.fromkeys([*(p.key_name for p in parsed), *arc_keys]))

        # The DMARC record, this host's SPF result and every key at once: the slowest
        # answer bounds the wait.
        spf_task = asyncio.ensure_future(self._spf())  # never raises: temperror instead
        dmarc_answer, *key_answers = await asyncio.gather(
            dmarc.find_record(from_domain, lookup), *(lookup(name) for name in key_names),
            return_exceptions=True)
        spf = await spf_task
        keys = dict(zip(key_names, key_answers, strict=True))

        reports = []
        for item in self.parsed:
            if isinstance(item, signature.ParsedSignature):
                reports.append(self._check(item, keys[item.key_name], hashes))
            else:
                info, reason = item
                reports.append(auth_results.DkimReport(
                    "permerror", reason, info.domain, info.identity, info.selector,
                    info.algorithm, info.b_prefix))
        outcome_dmarc = self._dmarc(from_domain, dmarc_answer, reports, spf)
        arc_result = self._arc(keys, hashes)
        if (outcome_dmarc.result == "fail" and arc_result is not None
                and arc_result.result == "pass" and arc_result.chain is not None):
            sealer = arc.dmarc_pass_vouched(arc_result.chain, self.milter.arc_trusted)
            if sealer is not None:
                outcome_dmarc = dataclasses.replace(outcome_dmarc, disposition="none",
                                                    arc_override=sealer)
        if forged := self._own_domain_forged(from_domain, reports):
            reply = mc.encode_reply_code(f"550 5.7.1 Message refused: {forged}")
            return reply, Outcome("verify", "reject", forged, {
                "dkim": ",".join(f"{r.result}:{r.domain or '?'}" for r in reports) or "none",
                "from_domain": from_domain})

        refused = (outcome_dmarc.result == "fail" and outcome_dmarc.disposition == "reject"
                   and self.settings.dmarc_reject)
        self._count_for_report(dmarc_answer, reports, spf, outcome_dmarc, refused)
        dkim_temporary = any(r.result == "temperror" for r in reports)
        undecided = outcome_dmarc.result == "temperror" or (
            dkim_temporary and outcome_dmarc.result != "pass")
        fields: dict[str, object] = {
            "dkim": ",".join(f"{r.result}:{r.domain or '?'}" for r in reports) or "none",
            "spf": spf.result if spf else "-",
            "dmarc": outcome_dmarc.result,
            "from_domain": outcome_dmarc.domain,
        }
        if arc_result is not None:
            fields["arc"] = arc_result.result
        if outcome_dmarc.arc_override:
            fields["dmarc_override"] = f"arc:{outcome_dmarc.arc_override}"
        if refused:
            reply = mc.encode_reply_code(
                f"550 5.7.1 Email rejected per DMARC policy for {outcome_dmarc.domain}")
            return reply, Outcome("verify", "reject", "DMARC policy reject", fields)
        if undecided:
            reason = "DNS temporary failure: " + (
                outcome_dmarc.reason if outcome_dmarc.result == "temperror"
                else next(r.reason for r in reports if r.result == "temperror"))
            failed, outcome = self._failure("verify", reason)
            outcome.fields.update(fields)
            if outcome.action == "tempfail":
                return failed, outcome
        else:
            outcome = Outcome("verify", "continue", fields=fields)
        value = auth_results.authentication_results(
            self.milter.authserv_id, reports, spf, outcome_dmarc, self._arc_report(arc_result))
        header = mc.encode_insert_header(
            0, *self._header_bytes(AUTH_RESULTS, value.encode("utf-8")))
        claimed = own_domain.display_name_claim(
            [_text(v) for v in self._header_values(b"from")], self.settings.domains)
        if claimed:
            outcome.fields["display_name_claims"] = claimed
            text = own_domain.warning(claimed, from_domain)
            header += mc.encode_insert_header(
                0, *self._header_bytes(WARNING_HEADER, text.encode("utf-8")))
        if self.seal_key is not None:
            header += self._seal(arc_result, value, outcome)
        return header + mc.CONTINUE, outcome

    def _seal(self, arc_result: arc.ArcResult | None, results: str, outcome: Outcome) -> bytes:
        """The ARC set for mail we forward (SECUMAIL_ARC_SEAL_DOMAINS), inserted on top:
        ARC-Seal first, then the message signature, then the results."""
        assert self.seal_key is not None
        sealed = arc.new_set(
            self.arc_chain, arc_result.result if arc_result is not None else "none",
            results.replace("\n", "\r\n").encode("utf-8"), self.headers,
            self.hashers[_SIGN_BODY].digest(), self.seal_key, int(self.milter.clock()))
        if sealed is None:
            outcome.fields["arc_sealed"] = "no: the chain it came with failed"
            return b""
        instance = len(self.arc_chain.sets) + 1 if self.arc_chain is not None else 1
        outcome.fields["arc_sealed"] = f"i={instance} d={self.seal_key.domain}"
        return b"".join(mc.encode_insert_header(0, *self._header_bytes(name, value))
                        for name, value in sealed)

    def _own_domain_forged(self, from_domain: str,
                           reports: list[auth_results.DkimReport]) -> str | None:
        """Why this mail from outside may not carry our own domain in its From, if so."""
        if self.settings.own_domain_from_outside != "reject":
            return None
        return own_domain.forgery(from_domain, self.settings.domains, reports,
                                  self.milter.keys.ours(time.time()),
                                  self.milter.allowed_outsiders, self.sender,
                                  self._origin().address)

    def _check(self, parsed: signature.ParsedSignature, answer: object,
               hashes: dict[tuple[str, str, int | None], tuple[bytes, int]],
               ) -> auth_results.DkimReport:
        report = auth_results.DkimReport(
            "permerror", "", parsed.domain, parsed.identity, parsed.selector,
            parsed.algorithm, parsed.b_prefix)
        record = key_record(answer)
        if isinstance(record, tuple):
            result, reason = record
            return dataclasses.replace(report, result=result, reason=reason)
        body_hash, body_length = hashes[parsed.body_hasher_key]
        verdict = signature.check(parsed, record, self.headers, body_hash, body_length)
        return dataclasses.replace(report, result=verdict.result, reason=verdict.reason,
                                   key_bits=record.bits, key_type=record.key_type)

    def _arc(self, keys: Mapping[str, object],
             hashes: dict[tuple[str, str, int | None], tuple[bytes, int]]
             ) -> arc.ArcResult | None:
        """The ARC chain's result (None: the message has no ARC field)."""
        if self.arc_error is not None:
            return arc.ArcResult("fail", self.arc_error)
        if self.arc_chain is None:
            return None
        records: dict[str, arc.KeyAnswer] = {}
        for name in self.arc_chain.key_names:
            record = key_record(keys[name])
            records[name] = record[1] if isinstance(record, tuple) else record
        return arc.validate(self.arc_chain, records, self.headers, hashes)

    def _arc_report(self, result: arc.ArcResult | None) -> auth_results.ArcReport | None:
        if result is None:
            return None
        origin = self._origin().address
        return auth_results.ArcReport(result.result, result.reason,
                                      str(origin) if origin else "", result.oldest_pass,
                                      result.instances)

    async def _spf(self) -> auth_results.SpfResult | None:
        """This host's own SPF result for the client, its HELO and its MAIL FROM (the SPF
        identity is the HELO name for the null sender, RFC 7208 2.4)."""
        check = self.milter.spf_check
        origin = self._origin()
        if check is None or origin.address is None:
            return None
        sender = self.sender
        if sender:
            identity, domain = "mailfrom", sender.rpartition("@")[2]
        else:
            identity, domain = "helo", origin.helo
        try:
            result = await check(str(origin.address), sender, origin.helo)
        except Exception as error:
            log_event(log, "SPF check failed", logging.WARNING, queue_id=self.queue_id,
                      error=f"{type(error).__name__}: {error}")
            result = "temperror"
        return auth_results.SpfResult(result, domain.lower().rstrip("."), identity)

    def _dmarc(self, from_domain: str, answer: object,
               reports: list[auth_results.DkimReport],
               spf: auth_results.SpfResult | None) -> dmarc.DmarcOutcome:
        if isinstance(answer, DnsTemporaryError):
            return dmarc.DmarcOutcome("temperror", from_domain, reason=str(answer))
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, tuple)
        record, from_organizational = answer
        return dmarc.evaluate(
            from_domain, record, from_organizational,
            [r.domain for r in reports if r.result == "pass"],
            spf.result if spf else "none", spf.domain if spf else "",
        )

    def _count_for_report(self, answer: object, reports: list[auth_results.DkimReport],
                          spf: auth_results.SpfResult | None, outcome: dmarc.DmarcOutcome,
                          refused: bool) -> None:
        """Count this check for its policy domain's aggregate report (SECUMAIL_DMARC_REPORTS),
        when the domain asks for reports: a few dictionary operations, the store is written
        every SECUMAIL_DMARC_REPORT_FLUSH seconds (services/dkim/server.py)."""
        tally = self.milter.tally
        if tally is None or outcome.result not in ("pass", "fail") or \
                not isinstance(answer, tuple) or answer[0] is None or not answer[0].rua:
            return
        record, from_organizational = answer
        policy_domain = dmarc.organizational_domain(outcome.domain) if from_organizational \
            else outcome.domain
        origin = self._origin().address
        spf_domain = spf.domain if spf else outcome.domain
        check = Check(
            source_ip=str(origin) if origin else "0.0.0.0", header_from=outcome.domain,
            disposition="reject" if refused else "none",
            dkim_aligned=outcome.dkim_aligned, spf_aligned=outcome.spf_aligned,
            spf=(spf_domain, "helo" if spf and spf.identity == "helo" else "mfrom",
                 spf.result if spf else "none"),
            dkim=tuple((r.domain or "unknown", r.selector, r.result) for r in reports),
            override="local_policy" if outcome.arc_override else "",
            override_comment=f"arc=pass, trusted sealer {outcome.arc_override}"
            if outcome.arc_override else "")
        tally.add(self.milter.clock(), Published.of(record, policy_domain), check)

    def _forged_auth_results(self) -> list[int]:
        """1-based positions, among Authentication-Results headers, of those that claim to
        come from this host: only the ones added here may (RFC 8601 5)."""
        positions = []
        position = 0
        for (_, value), name in zip(self.headers, self.field_names, strict=True):
            if name == b"authentication-results":
                position += 1
                if auth_results.claims_to_be(_text(value), self.milter.authserv_id):
                    positions.append(position)
        return positions

    def _event(self, outcome: Outcome) -> tracking.Event:
        """The tracking event: signed or verified (with the results) and passed on, or
        refused or deferred; the client is the real one (behind the filters too)."""
        outcome_word = {"continue": "passed", "reject": "refused"}.get(outcome.action,
                                                                       "deferred")
        results = " ".join(f"{k}={v}" for k, v in outcome.fields.items() if k != "reason")
        detail = "; ".join(part for part in (outcome.mode, results, outcome.reason) if part)
        origin = self._origin().address
        ids = self._header_values(b"message-id")
        return tracking.event(
            "dkim", outcome_word, detail, client=str(origin) if origin else "",
            sender=self.sender, queue_id=self.queue_id,
            message_id=tracking.message_id_value(_text(ids[0])) if ids else "")

    def _log(self, outcome: Outcome) -> None:
        failed = outcome.action != "continue" or "fail open" in outcome.reason
        level = logging.WARNING if failed else logging.INFO
        if outcome.reason:
            outcome.fields["reason"] = outcome.reason
        if self.forwarded is not None:  # behind the filters: who really sent it
            outcome.fields["origin"] = str(self.forwarded.address or "unknown")
        log_event(log, "message", level, mode=outcome.mode, action=outcome.action,
                  queue_id=self.queue_id, client=self.client, **outcome.fields)
        if tracking.EVENTS.enabled:
            tracking.record(self._event(outcome))
        if self.milter.on_outcome is not None:
            self.milter.on_outcome(outcome)


def key_record(answer: object) -> signature.KeyRecord | tuple[str, str]:
    """A key lookup's answer as the key, or (result, reason) when there is none: temperror
    for DNS trouble, permerror for no record or an unusable one."""
    if isinstance(answer, DnsTemporaryError):
        return "temperror", f"key lookup: {answer}"
    if isinstance(answer, BaseException):
        raise answer
    texts = [t for t in answer if isinstance(t, str)] if isinstance(answer, list) else []
    if not texts:
        return "permerror", "no key for signature"
    try:
        return signature.parse_key_record(texts[0].encode("latin-1"))
    except signature.KeyRecordError as error:
        return "permerror", str(error)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


