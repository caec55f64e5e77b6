"""DKIM key rotation without sockets: what a folder of keys means and what comes next (plain
functions), then the DKIM service's rotation step on a real folder with a fake DNS."""

from __future__ import annotations

import os
from pathlib import Path

from secumail import dkim_keys, dkim_rotation
from secumail.dkim_rotation import DAY, KeyState, Step, next_steps, roles
from secumail.dns import DnsTemporaryError
from secumail.settings import Settings
from services.dkim.server import AWAITING_RECORD, DkimService

NOW = 1_800_000_000.0


def key(selector: str, created: float, active: bool, key_type: str = "rsa",
        domain: str = "example.org") -> KeyState:
    return KeyState(domain, selector, key_type, active, created, f"v=DKIM1; p={selector}", 2048)


def test_a_signing_key_gets_a_successor_when_due_and_the_successor_waits_for_its_record(
) -> None:
    young = [key("s1", NOW - 10 * DAY, True)]
    assert next_steps(young, NOW, 90) == []
    old = [key("s1", NOW - 91 * DAY, True), key("e1", NOW - 10 * DAY, True, "ed25519")]
    assert next_steps(old, NOW, 90) == [Step("keygen", "example.org", "rsa", 2048)]
    assert next_steps(old, NOW, 0) == []  # off
    waiting = [*old, key("s2", NOW - DAY, False)]
    assert next_steps(waiting, NOW, 90) == [
        Step("await-record", "example.org", "rsa", 2048, "s2", "v=DKIM1; p=s2")]
    # A domain with no signing key is the admin's to set up, not rotation's.
    assert next_steps([key("s1", NOW - 400 * DAY, False)], NOW, 90) == []


def test_what_each_key_is() -> None:
    keys = [key("s0", NOW - 200 * DAY, False), key("s1", NOW - 100 * DAY, True),
            key("s2", NOW - DAY, False), key("x1", NOW, False, domain="other.example")]
    assert roles(keys, 90) == {
        ("example.org", "s0"): "retired", ("example.org", "s1"): "signing",
        ("example.org", "s2"): "awaiting-record", ("other.example", "x1"): "inactive"}
    assert roles(keys, 0)[("example.org", "s2")] == "inactive"


def test_a_record_counts_as_published_when_its_key_is_the_same() -> None:
    record = "v=DKIM1; k=rsa; p=MIIBIjANBgkq"
    assert dkim_rotation.record_published(["v=DKIM1; k=rsa; p=MIIB IjANBgkq"], record)
    assert dkim_rotation.record_published(["other", "v=DKIM1;p=MIIBIjANBgkq"], record)
    assert not dkim_rotation.record_published(["v=DKIM1; k=rsa; p=MIIBOLDKEY"], record)
    assert not dkim_rotation.record_published(None, record)
    assert not dkim_rotation.record_published(["v=DKIM1; p="], "v=DKIM1; p=")


def test_new_selectors_never_collide() -> None:
    assert dkim_rotation.new_selector(set(), NOW, "rsa") == "s20270115"
    assert dkim_rotation.new_selector({"s20270115"}, NOW, "rsa") == "s20270115b"
    assert dkim_rotation.new_selector(set(), NOW, "ed25519") == "s20270115e"


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing = False

    async def __call__(self, name: str) -> list[str] | None:
        if self.failing:
            raise DnsTemporaryError(f"{name}: Timeout")
        return self.records.get(name)


async def test_the_service_rotates_once_the_record_is_published(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = dkim_keys.keygen(keys_dir, "example.org", "s1", "rsa", 1024)
    os.utime(first.key_path, (NOW - 100 * DAY, NOW - 100 * DAY))
    service = DkimService(Settings(dkim_keys_dir=str(keys_dir), dkim_rotate_days=90,
                                   hostname="mx.secumail.test"))
    dns = FakeDns()
    service.lookup = dns  # type: ignore[assignment]

    await service.rotate(NOW)
    [successor] = [k for k in dkim_keys.list_keys(keys_dir) if k.selector != "s1"]
    assert successor.selector == "s20270115" and not successor.active
    assert successor.key_type == "rsa" and dkim_rotation._bits(successor.record_value) == 1024
    assert AWAITING_RECORD._value.get() == 1
    assert dkim_keys.read_active(keys_dir / "example.org") == ["s1"]

    dns.failing = True  # DNS trouble: keep waiting, sign with the old key
    await service.rotate(NOW + 600)
    assert dkim_keys.read_active(keys_dir / "example.org") == ["s1"]
    dns.failing = False
    dns.records[successor.record_name] = ["v=DKIM1; k=rsa; p=SOMEONEELSE"]
    await service.rotate(NOW + 1200)
    assert dkim_keys.read_active(keys_dir / "example.org") == ["s1"]

    dns.records[successor.record_name] = [successor.record_value]
    await service.rotate(NOW + 1800)
    assert dkim_keys.read_active(keys_dir / "example.org") == ["s20270115"]
    assert AWAITING_RECORD._value.get() == 0
    assert [k.selector for k in service.keys.lookup("example.org").keys] == ["s20270115"]
    states = dkim_rotation.key_states(keys_dir)
    assert roles(states, 90) == {("example.org", "s1"): "retired",
                                 ("example.org", "s20270115"): "signing"}
    await service.rotate(NOW + 2400)  # nothing due: no third key
    assert len(dkim_keys.list_keys(keys_dir)) == 2


async def test_only_one_replica_rotates_at_a_time(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = dkim_keys.keygen(keys_dir, "example.org", "s1", "rsa", 1024)
    os.utime(first.key_path, (NOW - 100 * DAY, NOW - 100 * DAY))
    service = DkimService(Settings(dkim_keys_dir=str(keys_dir), dkim_rotate_days=90))
    with dkim_rotation_lock(keys_dir):
        await service.rotate(NOW)  # another replica holds the lock
    assert len(dkim_keys.list_keys(keys_dir)) == 1
    await service.rotate(NOW)
    assert len(dkim_keys.list_keys(keys_dir)) == 2


def dkim_rotation_lock(keys_dir: Path):  # type: ignore[no-untyped-def]
    """The lock as another process holds it (flock locks are per open file)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():  # type: ignore[no-untyped-def]
        with open(keys_dir / ".rotation.lock", "a") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            yield
            fcntl.flock(other, fcntl.LOCK_UN)
    return held()
