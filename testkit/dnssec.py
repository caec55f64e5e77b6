"""A DNSSEC-signed zone of the tests' own (dnspython signs it, NSEC chain included), and the
DS record a validating resolver takes as its trust anchor: DANE's TLSA records are obeyed
only when the resolver could validate them."""

from __future__ import annotations

import hashlib

import dns.dnssec
import dns.name
import dns.rdatatype
import dns.zone
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def tlsa_3_1_1(certificate_pem: bytes) -> str:
    """`3 1 1 <hex>`: DANE-EE, the certificate's public key, SHA-256 (RFC 7671's advice)."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def signed_zone(origin: str, records: list[str]) -> tuple[str, str]:
    """The zone file text of `origin` with `records` ("name ttl IN type data", names
    relative to the origin), signed by one ECDSA P-256 key; and the trust anchor (a DS
    record in zone-file form)."""
    text = "\n".join([
        f"$ORIGIN {origin}.",
        "@ 300 IN SOA ns hostmaster 1 3600 600 86400 300",
        "@ 300 IN NS ns",
        *records,
    ]) + "\n"
    zone = dns.zone.from_text(text, origin=origin, relativize=False)
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                    flags=257)  # one key, zone and entry point (KSK)
    dns.dnssec.sign_zone(zone, keys=[(key, dnskey)], lifetime=30 * 86400)
    ds = dns.dnssec.make_ds(dns.name.from_text(origin), dnskey, "SHA256")
    return zone.to_text(relativize=False), f"{origin}. IN DS {ds.to_text()}\n"
