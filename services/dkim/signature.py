"""DKIM signatures (RFC 6376, RFC 8463): make one, check one. Plain functions, no I/O.

dkimpy parses the tag lists and checks the signature fields; the hashing of canonical
headers is ours (canonical.py), and every RSA or Ed25519 operation goes to OpenSSL through
`cryptography`: dkimpy's own RSA is pure Python, 25 times slower when signing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Final

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from secumail.dkim_keys import SigningKey, record_name
from services.dkim.canonical import CANONICALIZATIONS, RELAXED, field_name, header_hash_input

SIGNATURE_HEADER: Final = b"DKIM-Signature"
ARC_MESSAGE_SIGNATURE_HEADER: Final = b"ARC-Message-Signature"
MIN_RSA_BITS: Final = 1024

# Over-signed (RFC 6376 8.15; OpenDKIM's OversignHeaders, Rspamd's defaults): named in h=
# once more than the message has them, present or not, so none can be added without
# breaking the signature. A Reply-To or a second Subject put above the signed ones is what
# many mail clients show; an absent field named once signs its absence. RFC 8058 wants
# List-Unsubscribe-Post signed with List-Unsubscribe. (Sender is signed when present but not
# over-signed: mailing lists add one to mail they pass on unchanged.)
OVERSIGNED_HEADERS: Final = (
    b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id", b"mime-version",
    b"content-type", b"content-transfer-encoding", b"in-reply-to", b"references",
    b"list-unsubscribe", b"list-unsubscribe-post",
)
# The fields RFC 6376 5.4.1 says should be signed (dkimpy's list) and the over-signed ones,
# every instance, in the order they appear in the message.
SIGNED_HEADERS: Final = frozenset(dkim.DKIM.SHOULD) | frozenset(OVERSIGNED_HEADERS)

ALGORITHMS: Final = {
    b"rsa-sha256": ("rsa", "sha256"),
    b"ed25519-sha256": ("ed25519", "sha256"),
    b"rsa-sha1": ("rsa", "sha1"),
}

_WHITESPACE = re.compile(rb"\s+")
# RFC 6376 3.5: l= is 1 to 76 digits; s= and d= are DNS names (RFC 5321 sub-domains).
_LENGTH = re.compile(rb"[0-9]{1,76}\Z")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")  # "_" as DNS allows it

PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
# Fields a reader sees one of: a message with two, whose signature covers fewer, is no pass.
SHOWN_ONCE: Final = ((b"subject", "Subject"), (b"to", "To"), (b"date", "Date"))
_SHOWN_ONCE_NAMES: Final = tuple(name for name, _ in SHOWN_ONCE)


class SignatureSyntaxError(Exception):
    """A DKIM-Signature that cannot be evaluated (RFC 6376 PERMFAIL: permerror)."""


class KeyRecordError(Exception):
    """A key record that cannot be used (permerror)."""


# --- signing ------------------------------------------------------------------------------


def signed_header_names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """h=: every instance of the fields to sign, then each over-signed name once more (a
    verifier finds no instance left for it: the hash covers "none", RFC 6376 5.4.2)."""
    names = [name.lower() for name, _ in headers if name.lower() in SIGNED_HEADERS]
    return names + list(OVERSIGNED_HEADERS)


def fold_tags(tags: list[bytes], width: int = 76) -> bytes:
    """Tags joined by "; " with a fold (CRLF TAB) before a tag that would pass `width`.
    A long h= list is cut after its colons, where a verifier's unfolding changes nothing
    it compares (it strips the whitespace around each name)."""
    lines: list[bytes] = []
    line = b""
    pieces: list[bytes] = []
    for tag in tags:
        if len(tag) > width and tag.startswith(b"h="):
            names = tag.split(b":")
            pieces.extend(n + b":" for n in names[:-1])
            pieces.append(names[-1])
        else:
            pieces.append(tag)
    room = width - len(SIGNATURE_HEADER) - 2  # the first line starts after the name
    for piece in pieces:
        joiner = b"" if line.endswith(b":") else b" "
        if line and len(line) + len(piece) + 1 > room:
            lines.append(line)
            line = piece
            room = width - 1
        else:
            line = line + joiner + piece if line else piece
    lines.append(line)
    return b"\r\n\t".join(lines)


def _sign_bytes(key: SigningKey, data: bytes) -> bytes:
    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        return private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    # RFC 8463: Ed25519 signs the SHA-256 hash of the canonical headers, not the headers.
    return private.sign(hashlib.sha256(data).digest())


def sign(
    headers: list[tuple[bytes, bytes]], body_hash: bytes, key: SigningKey, timestamp: int,
    arc_instance: int = 0,
) -> bytes:
    """The DKIM-Signature value (after the colon, with a leading space, CRLF folds) for a
    message with these headers (values in CRLF form) and this relaxed body hash; with
    `arc_instance`, the ARC-Message-Signature of that instance (RFC 8617 4.1.2: the same
    signature, i= in place of v=)."""
    names = signed_header_names(headers)
    tags = [
        f"i={arc_instance};".encode() if arc_instance else b"v=1;",
        f"a={key.algorithm};".encode(), b"c=relaxed/relaxed;",
        f"d={key.domain};".encode(), f"s={key.selector};".encode(), f"t={timestamp};".encode(),
        b"h=" + b":".join(names) + b";", b"bh=" + base64.b64encode(body_hash) + b";",
    ]
    unsigned = b" " + fold_tags(tags) + b"\r\n\tb="
    name = ARC_MESSAGE_SIGNATURE_HEADER if arc_instance else SIGNATURE_HEADER
    data = header_hash_input(headers, names, (name, unsigned), relaxed=True)
    return unsigned + signature_value(key, data)


def signature_value(key: SigningKey, data: bytes) -> bytes:
    """b=, base64, folded, of `data` signed with `key` (DKIM signatures, ARC seals)."""
    value = base64.b64encode(_sign_bytes(key, data))
    return b"\r\n\t".join(value[i : i + 72] for i in range(0, len(value), 72))


# --- verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedSignature:
    name: bytes  # the header name as received (simple canonicalization keeps its case)
    value: bytes  # the header value as received, CRLF form
    domain: str
    selector: str
    identity: str
    algorithm: str
    key_type: str
    hash_name: str
    header_canonicalization: str
    body_canonicalization: str
    signed_headers: list[bytes]
    body_hash: bytes
    signature: bytes
    length: int | None

    @property
    def key_name(self) -> str:
        return record_name(self.domain, self.selector)

    @property
    def b_prefix(self) -> str:
        """The first characters of b=, which name the signature in Authentication-Results
        (RFC 6008)."""
        return base64.b64encode(self.signature)[:8].decode("ascii")

    @property
    def body_hasher_key(self) -> tuple[str, str, int | None]:
        return self.body_canonicalization, self.hash_name, self.length


@dataclass(frozen=True)
class SignatureInfo:
    """What is known of a signature for the report, even when it could not be parsed."""

    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    b_prefix: str = ""


def _decode_b64(value: bytes, tag: str) -> bytes:
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", value), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureSyntaxError(f"{tag}= is not base64") from None


def _tags(value: bytes) -> dict[bytes, bytes]:
    """A signature's tag=value list (RFC 6376 3.2), read as dkimpy's parse_tag_value reads
    it, at a fifth of its cost: it ran 2 to 4 times per message (a signature, an ARC set)
    and compiled its pattern each time."""
    tags: dict[bytes, bytes] = {}
    specs = value.replace(b"\r\n", b"").strip().split(b";")
    if not specs[-1]:
        specs.pop()  # a trailing ; is allowed
    for spec in specs:
        name, equals, tag_value = spec.partition(b"=")
        name = name.strip()
        if not equals or not name[:1].isalpha():
            raise SignatureSyntaxError(f"malformed tag list ({spec[:40]!r})")
        if name in tags:
            raise SignatureSyntaxError(f"malformed tag list ({name[:40]!r} twice)")
        tags[name] = tag_value.strip()
    return tags


def signature_fields(value: bytes) -> SignatureInfo:
    """Best-effort d=, s=, i=, a= and b= of a signature, for a header that failed to parse."""
    try:
        tags = _tags(value)
    except SignatureSyntaxError:
        return SignatureInfo()
    text = {k: v.decode("ascii", "replace") for k, v in tags.items()}
    b_prefix = _WHITESPACE.sub(b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
    return SignatureInfo(text.get(b"d", ""), text.get(b"s", ""), text.get(b"i", ""),
                         text.get(b"a", ""), b_prefix)


_ARC_FIELDS: Final = [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"]


def parse_signature(value: bytes, name: bytes = SIGNATURE_HEADER,
                    arc: bool = False) -> ParsedSignature:
    """Parse and check a DKIM-Signature value; SignatureSyntaxError says why it is unusable.
    `arc`: an ARC-Message-Signature (RFC 8617 4.1.2): no v=, i= is its instance, never
    signs an ARC-Seal, relaxed/relaxed unless c= says otherwise (as dkimpy reads it)."""
    tags = _tags(value)
    try:
        if arc:
            dkim.validate_signature_fields(tags, _ARC_FIELDS, True)
        else:
            dkim.validate_signature_fields(tags)
    except dkim.ValidationError as error:
        raise SignatureSyntaxError(str(error)) from None
    if arc:
        tags.setdefault(b"c", b"relaxed/relaxed")
        tags[b"i"] = b"@" + tags[b"d"]
    algorithm = tags[b"a"]
    if algorithm not in ALGORITHMS:
        raise SignatureSyntaxError(f"unknown algorithm {algorithm.decode(errors='replace')}")
    if algorithm == b"rsa-sha1":
        raise SignatureSyntaxError("rsa-sha1 signatures are not accepted any more (RFC 8301)")
    key_type, hash_name = ALGORITHMS[algorithm]
    canonicalization = tags.get(b"c", b"simple/simple").decode("ascii", "replace").lower()
    header_canon, _, body_canon = canonicalization.partition("/")
    body_canon = body_canon or "simple"
    if header_canon not in CANONICALIZATIONS or body_canon not in CANONICALIZATIONS:
        raise SignatureSyntaxError(f"unknown canonicalization {canonicalization}")
    if b"l" in tags and not _LENGTH.match(tags[b"l"]):
        raise SignatureSyntaxError("l= is not a number")
    signed = [n.strip().lower() for n in _WHITESPACE.sub(b"", tags[b"h"]).split(b":")]
    if b"from" not in signed:
        raise SignatureSyntaxError("From is not signed")
    if arc and b"arc-seal" in signed:
        raise SignatureSyntaxError("an ARC-Message-Signature may not sign ARC-Seal")
    domain = tags[b"d"].decode("ascii", "replace").lower().rstrip(".")
    if not _dns_name(domain):
        raise SignatureSyntaxError("d= is not a domain name")
    if "." not in domain:
        raise SignatureSyntaxError("d= is not a domain under a public suffix")
    selector = tags[b"s"].decode("ascii", "replace").lower()
    # Not a DNS name: no lookup can find its key, and the resolver would fail every time
    # (a "temporary" error for ever, and the mail deferred for ever).
    if not _dns_name(selector) or len(selector) + len(domain) + 12 > 253:
        raise SignatureSyntaxError("s= is not a valid selector")
    length = int(tags[b"l"]) if b"l" in tags else None
    return ParsedSignature(
        name=name, value=value, domain=domain, selector=selector,
        identity=tags.get(b"i", b"@" + tags[b"d"]).decode("utf-8", "replace"),
        algorithm=algorithm.decode(), key_type=key_type, hash_name=hash_name,
        header_canonicalization=header_canon, body_canonicalization=body_canon,
        signed_headers=signed, body_hash=_decode_b64(tags[b"bh"], "bh"),
        signature=_decode_b64(tags[b"b"], "b"), length=length,
    )


def _dns_name(name: str) -> bool:
    return all(_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True)
class KeyRecord:
    key: PublicKey
    key_type: str
    bits: int
    hashes: tuple[str, ...] | None  # None: any
    testing: bool  # t=y
    strict_identity: bool  # t=s


@functools.lru_cache(maxsize=4096)
def parse_key_record(record: bytes) -> KeyRecord:
    """A DKIM key record (RFC 6376 3.6.1) into a public key; KeyRecordError says why not.
    Cached: the same few records come back with every message of a sender."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as error:
        raise KeyRecordError(f"malformed key record ({error})") from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise KeyRecordError("key record is not v=DKIM1")
    key_type = tags.get(b"k", b"rsa").decode("ascii", "replace").lower()
    services = {s.strip() for s in tags.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        raise KeyRecordError("key is not for email (s=)")
    if b"p" not in tags:
        raise KeyRecordError("key record has no p=")
    raw_key = _WHITESPACE.sub(b"", tags[b"p"])
    if not raw_key:
        raise KeyRecordError("key revoked (empty p=)")
    try:
        der = base64.b64decode(raw_key, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRecordError("p= is not base64") from None
    key: PublicKey
    if key_type == "rsa":
        key = _load_rsa_public_key(der)
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise KeyRecordError(f"{bits}-bit RSA key is too small")
    elif key_type == "ed25519":
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(der)
        except ValueError:
            raise KeyRecordError("p= is not a 32-byte Ed25519 key") from None
        bits = 256
    else:
        raise KeyRecordError(f"unknown key type k={key_type}")
    hash_list = None
    if b"h" in tags:
        hash_list = tuple(h.strip().decode("ascii", "replace") for h in tags[b"h"].split(b":"))
    flags = {f.strip() for f in tags.get(b"t", b"").split(b":")}
    return KeyRecord(key, key_type, bits, hash_list, b"y" in flags, b"s" in flags)


def _load_rsa_public_key(der: bytes) -> rsa.RSAPublicKey:
    """SubjectPublicKeyInfo, as RFC 6376 says; some publish a bare PKCS#1 RSAPublicKey."""
    pkcs1_pem = (b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(der)
                 + b"-----END RSA PUBLIC KEY-----\n")
    for encoded, load in ((der, serialization.load_der_public_key),
                          (pkcs1_pem, serialization.load_pem_public_key)):
        try:
            key = load(encoded)
        except (ValueError, UnsupportedAlgorithm):
            continue
        if isinstance(key, rsa.RSAPublicKey):
            return key
        raise KeyRecordError("k=rsa but p= is not an RSA key")
    raise KeyRecordError("p= is not a public key")


def strip_b_value(value: bytes) -> bytes:
    """The signature header with the b= value (and whitespace around it) emptied (3.7).
    Tag values cannot contain ';', so splitting on it finds the tags exactly."""
    parts = value.split(b";")
    for index, part in enumerate(parts):
        name, equals, _ = part.partition(b"=")
        if equals and name.strip(b" \t\r\n") == b"b":
            parts[index] = part[: len(name) + 1]
    return b";".join(parts)


def verifies(key: PublicKey, signed: bytes, data: bytes) -> bool:
    """Whether `signed` is the key's SHA-256 signature of `data` (rsa-sha256, or
    ed25519-sha256, which signs the hash)."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signed, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signed, hashlib.sha256(data).digest())
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SignatureCheck:
    result: str  # pass, fail, policy, permerror (RFC 8601 dkim results)
    reason: str


def check(
    signature: ParsedSignature, record: KeyRecord, headers: list[tuple[bytes, bytes]],
    body_hash: bytes, body_length: int | None = None,
) -> SignatureCheck:
    """Check one parsed signature against its key, the headers and the computed body hash
    (and the canonical body's whole length, for a signature limited by l=)."""
    if record.key_type != signature.key_type:
        return SignatureCheck("permerror", f"key type {record.key_type} does not match a=")
    if record.hashes is not None and signature.hash_name not in record.hashes:
        return SignatureCheck("permerror", f"key does not allow {signature.hash_name}")
    if record.strict_identity:
        identity_domain = signature.identity.rpartition("@")[2].lower()
        if identity_domain != signature.domain:
            return SignatureCheck("permerror", "key requires i= in d= exactly (t=s)")
    if body_hash != signature.body_hash:
        return SignatureCheck("fail", "body hash did not verify")
    data = header_hash_input(
        headers, signature.signed_headers,
        (signature.name, strip_b_value(signature.value)),
        relaxed=signature.header_canonicalization == RELAXED,
    )
    if not verifies(record.key, signature.signature, data):
        return SignatureCheck("fail", "signature did not verify")
    present_counts = dict.fromkeys(_SHOWN_ONCE_NAMES, 0)
    for header_name, _ in headers:  # one pass, not one per name
        name = field_name(header_name)
        if name in present_counts:
            present_counts[name] += 1
    for name, label in SHOWN_ONCE:
        present = present_counts[name]
        covered = signature.signed_headers.count(name)
        if present > 1 and covered < present:
            # A second one added beside the signed one (RFC 6376 8.15): a mail client may
            # well show the unsigned one. Verified, but no pass for it.
            return SignatureCheck("policy", f"{present} {label} fields, the signature covers "
                                            f"{covered}")
    if signature.length is not None and body_length is not None:
        if body_length < signature.length:
            return SignatureCheck("permerror", "l= is longer than the body")
        if body_length > signature.length:
            # RFC 6376 8.2: anyone may append text to such a message. RFC 8601 2.7.1
            # "policy": the signature verified, but this host does not accept it as a pass.
            return SignatureCheck("policy", f"l= covers {signature.length} of {body_length} body "
                                     "bytes: text was added after signing")
    return SignatureCheck("pass", "")
