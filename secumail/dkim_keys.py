"""DKIM signing keys on disk, their DNS records, generation and rotation.

The keys folder is shared: the DKIM milter (services/dkim/) signs with the keys it finds
there (`KeyStore`), while the `secumail-dkim` key tool and the gateway's admin API
(gateway/routers/dkim.py) write and activate them with the functions below.

Layout of SECUMAIL_DKIM_KEYS_DIR (one folder per signing domain, as opendkim-genkey writes
its files, so OpenDKIM keys can be copied in):

    example.org/
        s2026a.private   the private key (PEM, PKCS#8 or PKCS#1), mode 0600
        s2026a.txt       the TXT record to publish, in zone-file form
        s2026e.private   an ed25519 key: a second signature (RFC 8463)
        active           the selectors signing now, one a line (one RSA, one ed25519 at most)

Rotation: `keygen` writes a new selector beside the old one without using it (unless the
domain has no active key of that type yet); once its TXT record is published, `activate`
rewrites `active` (atomically) and the milter signs with it within a second, while the old
record stays published for mail still in transit.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

KeyType = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
ACTIVE_FILE = "active"
KEY_SUFFIX = ".private"
RECORD_SUFFIX = ".txt"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})+\Z")


class KeyUnusable(Exception):
    """A key that should sign cannot: missing, unreadable, or not a usable key."""


def check_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a domain name: {domain!r}")
    return domain


def check_selector(selector: str) -> str:
    selector = selector.strip().lower()
    if not _SELECTOR.match(selector):
        raise ValueError(f"not a selector (letters, digits, '-' and '.'): {selector!r}")
    return selector


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    key_type: KeyType
    private_key: PrivateKey

    @property
    def algorithm(self) -> str:
        return "rsa-sha256" if self.key_type == "rsa" else "ed25519-sha256"


def key_type_of(key: object) -> KeyType:
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise KeyUnusable(f"unsupported key type {type(key).__name__} (RSA or Ed25519 only)")


def load_private_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KeyUnusable(f"cannot read {path}: {error.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyUnusable(f"{path} is not a PEM private key: {error}") from None
    key_type_of(key)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
        raise KeyUnusable(f"{path}: a {key.key_size}-bit RSA key is too small (1024 at least)")
    return key  # type: ignore[return-value]


def public_key_base64(key: PrivateKey) -> str:
    """The p= value: SubjectPublicKeyInfo DER for RSA, the raw 32 bytes for Ed25519."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def txt_record_value(key: PrivateKey) -> str:
    return f"v=DKIM1; k={key_type_of(key)}; p={public_key_base64(key)}"


def record_name(domain: str, selector: str) -> str:
    """Where a key's TXT record is published (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def zone_file_line(domain: str, selector: str, key: PrivateKey) -> str:
    """The record as a zone file line, the value cut into strings of at most 255 bytes."""
    value = txt_record_value(key)
    strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{record_name(domain, selector)}. IN TXT ( {strings} )"


# --- the keys folder, as the milter reads it ------------------------------------------------


@dataclass
class DomainKeys:
    keys: list[SigningKey]
    error: str = ""  # set when an active key cannot be used


def read_active(domain_dir: Path) -> list[str]:
    try:
        text = (domain_dir / ACTIVE_FILE).read_text()
    except FileNotFoundError:
        return []
    return [line.strip().lower() for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def load_domain(domain_dir: Path) -> DomainKeys:
    keys = []
    for selector in read_active(domain_dir):
        try:
            key = load_private_key(domain_dir / f"{selector}{KEY_SUFFIX}")
        except KeyUnusable as error:
            return DomainKeys([], f"selector {selector}: {error}")
        keys.append(SigningKey(domain_dir.name, selector, key_type_of(key), key))
    if len({k.key_type for k in keys}) != len(keys):
        return DomainKeys([], f"{domain_dir / ACTIVE_FILE} names two keys of one type")
    # RSA first: receivers that know no Ed25519 see the signature they can check on top.
    keys.sort(key=lambda k: k.key_type != "rsa")
    return DomainKeys(keys)


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _stamp(entry: os.DirEntry[str], name: str, stamps: list[tuple[str, int]]) -> None:
    try:
        stamps.append((name, entry.stat().st_mtime_ns))
    except FileNotFoundError:
        pass  # removed since the folder was listed: the next look sees the new state


class KeyStore:
    """Every domain's active keys, reloaded when the folder changes (checked once a second).

    A change is seen through modification times: of the domain folders (`activate` and
    `keygen` create files by rename) and of the files in them (a key replaced in place).
    """

    def __init__(self, path: str | Path, check_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, retired_days: float = 0.0
                 ) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self.clock = clock
        self.retired_days = retired_days
        self._domains: dict[str, DomainKeys] = {}
        self._ours: dict[tuple[str, str], float] = {}  # (domain, selector) -> ours until
        self._stamp: tuple[tuple[str, int], ...] | None = None
        self._checked = float("-inf")
        self.on_reload: Callable[[dict[str, DomainKeys]], None] | None = None

    def _current_stamp(self) -> tuple[tuple[str, int], ...]:
        stamps: list[tuple[str, int]] = []
        for entry in _entries(self.path):
            if entry.is_dir() and not entry.name.startswith("."):
                _stamp(entry, entry.name, stamps)
                for item in _entries(Path(entry.path)):
                    if not item.name.startswith("."):
                        _stamp(item, f"{entry.name}/{item.name}", stamps)
        return tuple(sorted(stamps))

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._checked < self.check_interval:
            return
        self._checked = now
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        domains = {}
        for name, _ in stamp:
            if "/" not in name:
                domains[name.lower()] = load_domain(self.path / name)
        self._domains = domains
        self._ours = self._our_keys(stamp, domains)
        if self.on_reload is not None:
            self.on_reload(domains)

    def _our_keys(self, stamp: tuple[tuple[str, int], ...], domains: dict[str, DomainKeys]
                  ) -> dict[tuple[str, str], float]:
        """Which keys' signatures are ours, and until when (Unix time): the active keys for
        good, and a key older than its domain's newest active one (retired by a rotation or
        by hand) for `retired_days` after that switch, while mail it signed is still out
        there (a forwarder may bring it back)."""
        mtimes = dict(stamp)
        ours: dict[tuple[str, str], float] = {}
        for domain, found in domains.items():
            active = {key.selector for key in found.keys}
            for selector in active:
                ours[(domain, selector.lower())] = float("inf")
            switched = mtimes.get(f"{domain}/{ACTIVE_FILE}")
            newest = max((mtimes.get(f"{domain}/{s}{KEY_SUFFIX}", 0) for s in active),
                         default=None)
            if not active or switched is None or newest is None:
                continue
            for name, mtime in mtimes.items():
                folder, _, file = name.partition("/")
                if folder == domain and file.endswith(KEY_SUFFIX) and mtime < newest:
                    selector = file.removesuffix(KEY_SUFFIX).lower()
                    ours.setdefault((domain, selector),
                                    switched / 1e9 + self.retired_days * 86400)
        return ours

    def ours(self, now: float) -> set[tuple[str, str]]:
        """(domain, selector) of every key whose signatures count as ours at `now`."""
        self.refresh()
        return {key for key, until in self._ours.items() if until > now}

    def lookup(self, domain: str) -> DomainKeys | None:
        """The keys for `domain`, or for its nearest parent that has keys (None: no keys)."""
        self.refresh()
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            found = self._domains.get(".".join(labels[start:]))
            if found is not None:
                return found
        return None

    @property
    def domains(self) -> dict[str, DomainKeys]:
        self.refresh()
        return self._domains


# --- key management (the secumail-dkim command, the gateway's admin API) --------------------


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def generate_key(key_type: KeyType, bits: int = 2048) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < 1024:
        raise ValueError("RSA keys for DKIM must have at least 1024 bits (2048 recommended)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class KeygenResult:
    key_path: Path
    domain: str
    selector: str
    activated: bool
    record_value: str
    zone_line: str

    @property
    def record_name(self) -> str:
        return record_name(self.domain, self.selector)


def keygen(keys_dir: Path, domain: str, selector: str | None = None,
           key_type: KeyType = "rsa", bits: int = 2048, activate_now: bool | None = None,
           ) -> KeygenResult:
    """Write a new key for `domain`; it signs at once only if no key of its type is active
    (or `activate_now` is true). Never overwrites an existing selector."""
    domain = check_domain(domain)
    if selector is None:
        selector = time.strftime("s%Y%m%d", time.gmtime()) + ("e" if key_type == "ed25519"
                                                              else "")
    selector = check_selector(selector)
    domain_dir = keys_dir / domain
    domain_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    key_path = domain_dir / f"{selector}{KEY_SUFFIX}"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists: choose another selector (--selector)")
    key = generate_key(key_type, bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    zone_line = zone_file_line(domain, selector, key)
    _write_atomically(domain_dir / f"{selector}{RECORD_SUFFIX}", zone_line.encode() + b"\n",
                      0o644)
    _write_atomically(key_path, pem, 0o600)
    if activate_now is None:
        activate_now = not any(k.key_type == key_type for k in load_domain(domain_dir).keys)
    if activate_now:
        activate(keys_dir, domain, selector)
    return KeygenResult(key_path, domain, selector, activate_now, txt_record_value(key),
                        zone_line)


def activate(keys_dir: Path, domain: str, selector: str) -> list[str]:
    """Make `selector` the key of its type that signs for `domain`; returns the new list."""
    domain, selector = check_domain(domain), check_selector(selector)
    domain_dir = keys_dir / domain
    key = load_private_key(domain_dir / f"{selector}{KEY_SUFFIX}")
    key_type = key_type_of(key)
    kept = []
    for other in read_active(domain_dir):
        if other == selector:
            continue
        try:
            other_type = key_type_of(load_private_key(domain_dir / f"{other}{KEY_SUFFIX}"))
        except KeyUnusable:
            continue  # a broken entry goes: it could not sign anyway
        if other_type != key_type:
            kept.append(other)
    selectors = [*kept, selector]
    _write_atomically(domain_dir / ACTIVE_FILE, "".join(f"{s}\n" for s in selectors).encode(),
                      0o644)
    return selectors


@dataclass(frozen=True)
class KeyListing:
    domain: str
    selector: str
    key_type: str
    active: bool
    record_value: str
    error: str = ""

    @property
    def record_name(self) -> str:
        return record_name(self.domain, self.selector)


def list_keys(keys_dir: Path) -> list[KeyListing]:
    listings: list[KeyListing] = []
    if not keys_dir.is_dir():
        return listings
    for domain_dir in sorted(p for p in keys_dir.iterdir() if p.is_dir()):
        active = set(read_active(domain_dir))
        for key_path in sorted(domain_dir.glob(f"*{KEY_SUFFIX}")):
            selector = key_path.name.removesuffix(KEY_SUFFIX)
            try:
                key = load_private_key(key_path)
            except KeyUnusable as error:
                listings.append(KeyListing(domain_dir.name, selector, "?", selector in active,
                                           "", str(error)))
                continue
            listings.append(KeyListing(domain_dir.name, selector, key_type_of(key),
                                       selector in active, txt_record_value(key)))
    return listings
