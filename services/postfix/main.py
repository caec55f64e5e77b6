"""`secumail-postfix`: the Postfix container's entry point.

Renders the configuration from the settings, makes a self-signed certificate when none is
mounted, prepares the queue and mail volumes, then runs Postfix (`postfix start-fg`) under
a small supervisor (supervisor.py) that serves Postfix's metrics and the probe mailbox on
the metrics listener and turns SIGTERM into `postfix stop`.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secumail.logs import log_event, setup_logging
from secumail.netaddr import IPAddress
from secumail.runtime import warn_misplaced_secrets
from secumail.settings import Settings, load_settings, misplaced_in_env_file
from services.postfix.render import MAILBOX_BASE, VMAIL_ID, render
from services.postfix.supervisor import supervise

log = logging.getLogger("secumail.postfix")
CONFIG_DIR = Path("/etc/postfix")


def write_config(settings: Settings, directory: Path = CONFIG_DIR) -> None:
    for name, content in render(settings).items():
        (directory / name).write_text(content)


def ensure_certificate(cert_file: str, key_file: str, hostname: str) -> bool:
    """Make a self-signed certificate for STARTTLS unless one is there; True if made."""
    cert, key = Path(cert_file), Path(key_file)
    if cert.exists() and key.exists():
        return False
    cert.parent.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return True


def local_addresses(fib_trie: str) -> set[IPAddress]:
    """This container's own IPv4 addresses, from /proc/net/fib_trie (no `ip` tool needed):
    each address is the `|-- A.B.C.D` line just before a `/32 host LOCAL` line."""
    addresses: set[IPAddress] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text.split()[-1]
        elif text == "/32 host LOCAL" and last:
            addresses.add(ipaddress.ip_address(last))
    return addresses


def subnet_mismatches(settings: Settings, addresses: set[IPAddress]) -> list[str]:
    """The subnet settings this container has no address in. Compose makes a network once
    and keeps its subnet: a subnet changed in .env after that, or one set in secumail.env,
    would leave the settings and the network silently apart."""
    return [
        f"{name}={subnet}, but this container's addresses are "
        f"{', '.join(sorted(map(str, addresses))) or 'none'}: set it in .env (compose "
        "reads it there for the network), and after a change `docker compose down` then "
        "`up -d`, so that the network is made anew"
        for name, subnet in settings.subnets.items()
        if not any(a in subnet for a in addresses)
    ]


def check_subnets(settings: Settings, fib_trie: Path = Path("/proc/net/fib_trie")) -> None:
    if not Path("/.dockerenv").exists() or not fib_trie.exists():
        return  # not in a container (the service tests run Postfix on loopback)
    problems = subnet_mismatches(settings, local_addresses(fib_trie.read_text()))
    for problem in problems:
        print(f"secumail: invalid setting {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(2)


ENV_FILE = Path("/etc/secumail/secumail.env")  # compose mounts it, read-only


def check_env_file(env_file: Path = ENV_FILE) -> None:
    """Refuse to start on a secumail.env that sets what only compose reads (from .env):
    compose would silently hand the containers other values than the admin wrote."""
    if not env_file.exists():
        return
    misplaced = misplaced_in_env_file(env_file.read_text(errors="replace"))
    for name in misplaced:
        print(f"secumail: invalid setting {name} in secumail.env: compose reads it from .env "
              "(next to compose.yaml) and ignores it here; move it there", file=sys.stderr)
    if misplaced:
        raise SystemExit(2)


def prepare(settings: Settings) -> None:
    write_config(settings)
    if ensure_certificate(settings.tls_cert_file, settings.tls_key_file, settings.hostname):
        log_event(log, "made a self-signed certificate", file=settings.tls_cert_file)
    os.makedirs(MAILBOX_BASE, exist_ok=True)
    os.chown(MAILBOX_BASE, VMAIL_ID, VMAIL_ID)
    # An empty queue volume on first start: create Postfix's directories with their owners.
    subprocess.run(["postfix", "set-permissions", "create-missing"], check=False)
    # Queue files restored from a backup (secumail-backup) carry their old inode numbers in
    # their names: renamed to the new ones, as Postfix asks after moving a queue.
    subprocess.run(["postsuper", "-s"], check=False)
    subprocess.run(["postfix", "check"], check=True)
    log_event(log, "configured postfix", domains=",".join(settings.domains),
              hostname=settings.hostname)


def main() -> None:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    warn_misplaced_secrets("postfix")
    check_env_file()
    check_subnets(settings)
    prepare(settings)
    sys.exit(supervise(settings, MAILBOX_BASE))


if __name__ == "__main__":
    main()
