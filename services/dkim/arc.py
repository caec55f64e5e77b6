"""ARC (RFC 8617): the chain of seals forwarders add, checked. Plain functions, no I/O.

A mailing list or a forwarder breaks SPF and often DKIM, so DMARC fails for honest mail. Each
ARC-aware hop adds a set of three fields with the same instance i=: ARC-Authentication-Results
(what it found), ARC-Message-Signature (a DKIM signature of the message as it passed it on)
and ARC-Seal (a signature of all the sets so far). Validation (5.2): the sets are numbered 1
to N without gap or double, at most 50; the newest seal did not say the chain had failed; the
newest message signature verifies; every seal verifies over the sets up to its own, seal 1
saying cv=none and every later one cv=pass. The message signatures reuse the DKIM code
(signature.py), their bodies hashed by the milter's streaming hashers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from secumail.dkim_keys import SigningKey, record_name
from services.dkim import signature
from services.dkim.canonical import canonical_header, field_name

RESULTS: Final = b"arc-authentication-results"
MESSAGE_SIGNATURE: Final = b"arc-message-signature"
SEAL: Final = b"arc-seal"
NAMES: Final = (RESULTS, MESSAGE_SIGNATURE, SEAL)  # a set's order in the seal's hash
MAX_INSTANCES: Final = 50  # RFC 8617 4.2.1
_AAR_INSTANCE = re.compile(rb"\A[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]{1,3})[ \t\r\n]*;")
_WHITESPACE = re.compile(rb"\s+")

Header = tuple[bytes, bytes]


class ChainError(ValueError):
    """Why a chain fails as it stands, before any key is asked."""


@dataclass(frozen=True)
class Seal:
    instance: int
    domain: str
    selector: str
    cv: str  # none, pass, fail: what this sealer found of the chain before it
    algorithm: str
    key_type: str
    signature: bytes
    header: Header

    @property
    def key_name(self) -> str:
        return record_name(self.domain, self.selector)


@dataclass(frozen=True)
class Chain:
    """The sets, oldest first (instance i at index i-1)."""

    sets: list[tuple[Header, Header, Header]]  # (results, message signature, seal)
    signatures: list[signature.ParsedSignature | None]  # None: unusable (an old one only)
    seals: list[Seal]

    @property
    def key_names(self) -> list[str]:
        names = [s.key_name for s in self.signatures if s is not None]
        names += [s.key_name for s in self.seals]
        return list(dict.fromkeys(names))

    @property
    def sealers(self) -> list[str]:
        return [seal.domain for seal in self.seals]

    def results(self, instance: int) -> str:
        """ARC-Authentication-Results of one instance, as text after its `i=N;`."""
        value = self.sets[instance - 1][0][1]
        return _AAR_INSTANCE.sub(b"", value, count=1).decode("utf-8", "replace")




def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return signature._tags(value)
    except signature.SignatureSyntaxError as error:
        raise ChainError(str(error)) from None


def _instance(kind: bytes, name: bytes, value: bytes) -> int:
    if kind == RESULTS:
        match = _AAR_INSTANCE.match(value)
        text = match[1] if match else b""
    else:
        text = _WHITESPACE.sub(b"", _tags(value).get(b"i", b""))
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise ChainError(f"{name.decode(errors='replace')} without a valid instance i=")
    return int(text)


def parse_seal(instance: int, header: Header) -> Seal:
    tags = _tags(header[1])
    for tag in (b"a", b"b", b"cv", b"d", b"s"):
        if tag not in tags:
            raise ChainError(f"ARC-Seal i={instance} has no {tag.decode()}=")
    if b"h" in tags:
        raise ChainError(f"ARC-Seal i={instance} has h= (RFC 8617 4.1.3)")
    algorithm = tags[b"a"].strip()
    if algorithm not in (b"rsa-sha256", b"ed25519-sha256"):
        raise ChainError(f"ARC-Seal i={instance}: unknown algorithm")
    cv = tags[b"cv"].strip().lower().decode("ascii", "replace")
    if cv not in ("none", "pass", "fail"):
        raise ChainError(f"ARC-Seal i={instance}: cv={cv} is none of none, pass, fail")
    domain = tags[b"d"].strip().decode("ascii", "replace").lower().rstrip(".")
    selector = tags[b"s"].strip().decode("ascii", "replace").lower()
    if not (signature._dns_name(domain) and "." in domain and signature._dns_name(selector)):
        raise ChainError(f"ARC-Seal i={instance}: d= or s= is no DNS name")
    try:
        signed = signature._decode_b64(tags[b"b"], "b")
    except signature.SignatureSyntaxError as error:
        raise ChainError(f"ARC-Seal i={instance}: {error}") from None
    key_type = signature.ALGORITHMS[algorithm][0]
    return Seal(instance, domain, selector, cv, algorithm.decode(), key_type, signed, header)


def collect(headers: list[Header]) -> Chain | None:
    """The message's ARC chain (None: it has no ARC field); ChainError when its structure
    fails (5.2 steps 1 to 3): too many sets, a gap, a double, a set missing a field, a
    chain its newest sealer said had failed, a cv= out of order, an unusable signature."""
    found: dict[int, dict[bytes, Header]] = {}
    count = 0
    for name, value in headers:
        kind = field_name(name)
        if kind not in NAMES:
            continue
        count += 1
        if count > 3 * MAX_INSTANCES:
            raise ChainError(f"more than {MAX_INSTANCES} ARC sets")
        instance = _instance(kind, name, value)
        fields = found.setdefault(instance, {})
        if kind in fields:
            raise ChainError(f"two {name.decode()} fields with i={instance}")
        fields[kind] = (name, value)
    if not found:
        return None
    newest = max(found)
    if newest > MAX_INSTANCES:
        raise ChainError(f"i={newest}: more than {MAX_INSTANCES} ARC sets (RFC 8617 4.2.1)")
    sets = []
    for instance in range(1, newest + 1):
        fields = found.get(instance, {})
        if len(fields) != 3:
            raise ChainError(f"ARC set i={instance} is missing or incomplete")
        sets.append((fields[RESULTS], fields[MESSAGE_SIGNATURE], fields[SEAL]))
    seals = [parse_seal(i, s[2]) for i, s in enumerate(sets, start=1)]
    if seals[-1].cv == "fail":
        raise ChainError(f"ARC-Seal i={newest} says the chain had failed (cv=fail)")
    for seal in seals:
        wanted = "none" if seal.instance == 1 else "pass"
        if seal.cv != wanted:
            raise ChainError(f"ARC-Seal i={seal.instance} says cv={seal.cv}, not {wanted}")
    signatures: list[signature.ParsedSignature | None] = []
    for instance, (_, (name, value), _) in enumerate(sets, start=1):
        try:
            signatures.append(signature.parse_signature(value, name, arc=True))
        except signature.SignatureSyntaxError as error:
            if instance == newest:
                raise ChainError(f"ARC-Message-Signature i={instance}: {error}") from None
            signatures.append(None)  # an old one: it only lowers oldest-pass
    return Chain(sets, signatures, seals)


def seal_hash_input(chain: Chain | list[tuple[Header, Header, Header]], instance: int
                    ) -> bytes:
    """What the seal of `instance` signs (5.1.1): every set up to it, oldest first, each
    as results, message signature, seal, relaxed; its own seal without b= nor final CRLF."""
    sets = chain.sets if isinstance(chain, Chain) else chain
    parts = []
    for number, fields in enumerate(sets[:instance], start=1):
        for name, value in fields:
            if number == instance and field_name(name) == SEAL:
                value = signature.strip_b_value(value)
                parts.append(canonical_header(name, value, relaxed=True)[:-2])
            else:
                parts.append(canonical_header(name, value, relaxed=True))
    return b"".join(parts)


@dataclass(frozen=True)
class ArcResult:
    result: str  # pass, fail, none
    reason: str = ""
    chain: Chain | None = None
    oldest_pass: int | None = None  # the oldest instance from which every AMS verifies
    # (0: all of them), for a passing chain

    @property
    def instances(self) -> int:
        return len(self.chain.sets) if self.chain else 0


KeyAnswer = signature.KeyRecord | str  # the key, or why there is none


def validate(chain: Chain, keys: dict[str, KeyAnswer], headers: list[Header],
             body_hashes: dict[tuple[str, str, int | None], tuple[bytes, int]]) -> ArcResult:
    """5.2 steps 4 to 7, with the keys and body hashes in hand."""

    def key(name: str, key_type: str) -> signature.KeyRecord | str:
        record = keys.get(name, "no key")
        if isinstance(record, signature.KeyRecord) and record.key_type != key_type:
            return f"key type {record.key_type} does not match a="
        return record

    def message_signature_verifies(index: int) -> str:
        parsed = chain.signatures[index]
        if parsed is None:
            return "unusable"
        record = key(parsed.key_name, parsed.key_type)
        if isinstance(record, str):
            return record
        body_hash, length = body_hashes[parsed.body_hasher_key]
        verdict = signature.check(parsed, record, headers, body_hash, length)
        return "" if verdict.result == "pass" else verdict.reason or verdict.result

    newest = len(chain.sets)
    why = message_signature_verifies(newest - 1)
    if why:
        return ArcResult("fail", f"ARC-Message-Signature i={newest}: {why}", chain)
    for seal in reversed(chain.seals):
        record = key(seal.key_name, seal.key_type)
        if isinstance(record, str):
            return ArcResult("fail", f"ARC-Seal i={seal.instance}: {record}", chain)
        if not signature.verifies(record.key, seal.signature,
                                  seal_hash_input(chain, seal.instance)):
            return ArcResult("fail", f"ARC-Seal i={seal.instance} did not verify", chain)
    oldest = 0
    for index in range(newest - 2, -1, -1):
        if message_signature_verifies(index):
            oldest = index + 2
            break
    return ArcResult("pass", "", chain, oldest)


def dmarc_pass_vouched(chain: Chain, trusted: frozenset[str]) -> str | None:
    """The trusted sealer whose own results said dmarc=pass, with every sealer after it
    trusted too (each of them could have altered the message); None when none did. A
    sealer is trusted when its d= or a parent domain of it is in `trusted`."""
    for seal in reversed(chain.seals):
        if not _trusted(seal.domain, trusted):
            return None
        if re.search(r"(?:^|;)\s*dmarc\s*=\s*pass\b", chain.results(seal.instance), re.I):
            return seal.domain
    return None


def _trusted(domain: str, trusted: frozenset[str]) -> bool:
    labels = domain.split(".")
    return any(".".join(labels[i:]) in trusted for i in range(len(labels) - 1))


# --- sealing (RFC 8617 5.1) -------------------------------------------------------------------

RESULTS_HEADER: Final = b"ARC-Authentication-Results"
SEAL_HEADER: Final = b"ARC-Seal"


def new_set(chain: Chain | None, chain_result: str, results: bytes,
            headers: list[Header], body_hash: bytes, key: SigningKey, timestamp: int
            ) -> list[Header] | None:
    """The set this host adds, sealed with `key` (RSA: RFC 8617 names rsa-sha256 only):
    ARC-Authentication-Results (`results`, our Authentication-Results value without its
    leading space), ARC-Message-Signature of the message as it is (`headers`, values in CRLF
    form; `body_hash`: its relaxed SHA-256 body hash) and ARC-Seal over every set. The
    chain as it arrived decides the instance and cv=: none for the first set, pass after a
    passing chain; None (no set) after a failing one (`chain_result` fail: whatever its
    structure), or past the 50th."""
    instance = 1 if chain is None else len(chain.sets) + 1
    if chain_result == "fail" or instance > MAX_INSTANCES:
        return None
    aar = (RESULTS_HEADER, f" i={instance}; ".encode() + results.lstrip())
    ams = (signature.ARC_MESSAGE_SIGNATURE_HEADER,
           signature.sign(headers, body_hash, key, timestamp, arc_instance=instance))
    tags = [f"i={instance};".encode(), f"a={key.algorithm};".encode(),
            b"cv=none;" if instance == 1 else b"cv=pass;", f"d={key.domain};".encode(),
            f"s={key.selector};".encode(), f"t={timestamp};".encode()]
    unsigned = b" " + signature.fold_tags(tags) + b"\r\n\tb="
    sets = [*(chain.sets if chain is not None else []), (aar, ams, (SEAL_HEADER, unsigned))]
    seal = (SEAL_HEADER, unsigned + signature.signature_value(
        key, seal_hash_input(sets, instance)))
    return [aar, ams, seal]
