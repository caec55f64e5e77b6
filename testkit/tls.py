"""A certificate authority of the tests' own, and certificates from it or self-signed, for
TLS peers that must be verified (MTA-STS destinations and their policy hosts)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, key: Key, certificate: x509.Certificate) -> None:
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (folder / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _certificate(subject: str, names: list[str], public: ec.EllipticCurvePublicKey,
                 issuer: str, signer: Key, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_test_pki(folder: Path, issued: dict[str, list[str]], self_signed: dict[str, list[str]]
                   ) -> None:
    """ca.pem, and for each stem in `issued` a certificate from that CA (stem.pem, stem.key)
    for its names; each in `self_signed` signed by its own key. Readable by any user (the
    containers' users read them)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = "SecuMail tests' CA"
    _write(folder, "ca", ca_key, _certificate(ca_name, [], ca_key.public_key(), ca_name,
                                              ca_key, ca=True))
    for stem, names in issued.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, stem, key, _certificate(names[0], names, key.public_key(), ca_name,
                                               ca_key))
    for stem, names in self_signed.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, stem, key, _certificate(names[0], names, key.public_key(), names[0],
                                               key))
    for path in folder.iterdir():
        path.chmod(0o644)
