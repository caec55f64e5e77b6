"""DKIM keys that rotate themselves (SECUMAIL_DKIM_ROTATE_DAYS).

A key that signs for years is a key that leaks one day. Every SECUMAIL_DKIM_ROTATE_DAYS the DKIM
service writes a successor of each signing key (same type and size, selector s<YYYYMMDD>), and
says which TXT record to publish (its log, the gauge secumail_dkim_keys_awaiting_record, the
gateway's /admin/dkim/keys). It asks DNS until the record is there, then signs with the new key.
The old key stays in the folder, not signing: receivers may still verify mail it signed, so
its record stays published for SECUMAIL_DKIM_RETIRED_DAYS; the listing says from when it can go.

What a folder of keys means (`roles`) and what to do next (`next_steps`) are plain functions
here, shared by the DKIM service (which acts) and the gateway (which shows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dkim.util import InvalidTagValueList, parse_tag_value

from secumail.dkim_keys import (
    ACTIVE_FILE,
    KEY_SUFFIX,
    KeyListing,
    check_selector,
    list_keys,
)

DAY = 86400.0
Role = Literal["signing", "awaiting-record", "retired", "inactive"]


@dataclass(frozen=True)
class KeyState:
    domain: str
    selector: str
    key_type: str
    active: bool
    created: float  # the key file's modification time (keygen writes it once)
    record_value: str
    bits: int = 2048


def key_states(keys_dir: Path, listed: list[KeyListing] | None = None) -> list[KeyState]:
    """The usable keys with their ages; `listed`: `list_keys` already read (it loads every
    private key: once is enough)."""
    states = []
    for item in list_keys(keys_dir) if listed is None else listed:
        if item.error:
            continue
        path = keys_dir / item.domain / f"{item.selector}{KEY_SUFFIX}"
        try:
            created = path.stat().st_mtime
        except OSError:
            continue
        states.append(KeyState(item.domain, item.selector, item.key_type, item.active, created,
                               item.record_value, _bits(item.record_value)))
    return states


def _bits(record: str) -> int:
    """An RSA key's size from its record's p= (base64 of its DER: ~ 294 bytes for 2048)."""
    try:
        key = parse_tag_value(record.encode()).get(b"p", b"")
    except InvalidTagValueList:
        return 2048
    return 1024 if len(key) < 300 else 2048 if len(key) < 500 else 4096


def activated_at(keys_dir: Path, domain: str) -> float | None:
    """When the domain's signing keys last changed (its `active` file was written)."""
    try:
        return (keys_dir / domain / ACTIVE_FILE).stat().st_mtime
    except OSError:
        return None


@dataclass(frozen=True)
class Step:
    action: Literal["keygen", "await-record"]
    domain: str
    key_type: str
    bits: int = 2048
    selector: str = ""  # await-record: the successor waiting for its record
    record_value: str = ""


def next_steps(keys: list[KeyState], now: float, rotate_days: float) -> list[Step]:
    """For each (domain, key type) that signs: its successor waiting for its DNS record, or a
    successor to make once the signing key is `rotate_days` old. Nothing when off (0)."""
    if rotate_days <= 0:
        return []
    steps = []
    groups: dict[tuple[str, str], list[KeyState]] = {}
    for key in keys:
        groups.setdefault((key.domain, key.key_type), []).append(key)
    for (domain, key_type), group in sorted(groups.items()):
        signing = [k for k in group if k.active]
        if not signing:
            continue
        current = max(signing, key=lambda k: k.created)
        successors = [k for k in group if not k.active and k.created > current.created]
        if successors:
            newest = max(successors, key=lambda k: k.created)
            steps.append(Step("await-record", domain, key_type, newest.bits, newest.selector,
                              newest.record_value))
        elif now - current.created >= rotate_days * DAY:
            steps.append(Step("keygen", domain, key_type, current.bits))
    return steps


def roles(keys: list[KeyState], rotate_days: float) -> dict[tuple[str, str], Role]:
    """What each (domain, selector) is now: signing, a successor awaiting its record (only
    with rotation on), retired (an older key of a type that signs), or inactive."""
    found: dict[tuple[str, str], Role] = {}
    for key in keys:
        signing = [k for k in keys if k.domain == key.domain and k.key_type == key.key_type
                   and k.active]
        if key.active:
            role: Role = "signing"
        elif signing and key.created < max(k.created for k in signing):
            role = "retired"
        elif signing and rotate_days > 0:
            role = "awaiting-record"
        else:
            role = "inactive"
        found[(key.domain, key.selector)] = role
    return found


def record_published(answers: list[str] | None, record_value: str) -> bool:
    """Whether one of the TXT strings found is the key's record (its p= the same)."""
    def key_of(text: str) -> bytes:
        try:
            return b"".join(parse_tag_value(text.encode("latin-1")).get(b"p", b"").split())
        except (InvalidTagValueList, UnicodeEncodeError):
            return b""

    wanted = key_of(record_value)
    return bool(wanted) and any(key_of(answer) == wanted for answer in answers or [])


def new_selector(existing: set[str], now: float, key_type: str) -> str:
    """s<YYYYMMDD> (+ e for Ed25519), with a letter added if that one exists already."""
    base = time.strftime("s%Y%m%d", time.gmtime(now)) + ("e" if key_type == "ed25519" else "")
    for suffix in ("", *"bcdefghijklmnopqrstuvwxyz"):
        if base + suffix not in existing:
            return check_selector(base + suffix)
    raise ValueError(f"no free selector for {base}")
