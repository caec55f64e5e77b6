"""Key generation, DNS records, activation (rotation) and the milter's view of the keys."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from secumail import dkim_keys as keys
from services.dkim.main import main
from services.dkim.signature import parse_key_record


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keygen_writes_key_and_record_and_activates_the_first_key(tmp_path: Path) -> None:
    result = keys.keygen(tmp_path, "Example.ORG", "s1", "rsa", 2048)
    key_file = tmp_path / "example.org" / "s1.private"
    assert result.key_path == key_file and result.activated
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert result.record_name == "s1._domainkey.example.org"
    record = parse_key_record(result.record_value.encode())
    assert record.key_type == "rsa" and record.bits == 2048
    zone = (tmp_path / "example.org" / "s1.txt").read_text()
    assert zone.startswith("s1._domainkey.example.org. IN TXT ( ")
    strings = zone.split('"')[1::2]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == result.record_value
    assert keys.read_active(tmp_path / "example.org") == ["s1"]


def test_rotation_keeps_the_old_key_until_activated(tmp_path: Path) -> None:
    clock = Clock()
    store = keys.KeyStore(tmp_path, clock=clock)
    keys.keygen(tmp_path, "example.org", "old")
    assert [k.selector for k in store.lookup("example.org").keys] == ["old"]  # type: ignore[union-attr]
    new = keys.keygen(tmp_path, "example.org", "new")
    assert not new.activated
    clock.now += 2
    assert [k.selector for k in store.lookup("example.org").keys] == ["old"]  # type: ignore[union-attr]
    keys.activate(tmp_path, "example.org", "new")
    assert [k.selector for k in store.lookup("example.org").keys] == ["old"]  # type: ignore[union-attr]
    clock.now += 2  # the milter looks again at most once a second
    assert [k.selector for k in store.lookup("example.org").keys] == ["new"]  # type: ignore[union-attr]
    assert (tmp_path / "example.org" / "old.private").exists()  # still there for the record


def test_an_ed25519_key_signs_beside_the_rsa_key(tmp_path: Path) -> None:
    keys.keygen(tmp_path, "example.org", "r1", "rsa")
    result = keys.keygen(tmp_path, "example.org", "e1", "ed25519")
    assert result.activated  # first of its type
    assert result.record_value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(result.record_value.split("p=")[1])) == 32
    found = keys.KeyStore(tmp_path).lookup("example.org")
    assert found is not None
    assert [(k.selector, k.algorithm) for k in found.keys] == [
        ("r1", "rsa-sha256"), ("e1", "ed25519-sha256")]
    keys.keygen(tmp_path, "example.org", "e2", "ed25519", activate_now=True)
    assert keys.read_active(tmp_path / "example.org") == ["r1", "e2"]


def test_parent_domain_key_signs_subdomains(tmp_path: Path) -> None:
    keys.keygen(tmp_path, "example.org", "s1")
    store = keys.KeyStore(tmp_path)
    found = store.lookup("Mail.Example.Org")
    assert found is not None and found.keys[0].domain == "example.org"
    assert store.lookup("example.net") is None
    assert store.lookup("org") is None


def test_broken_active_key_is_reported_not_fatal(tmp_path: Path) -> None:
    keys.keygen(tmp_path, "example.org", "s1")
    (tmp_path / "example.org" / "s1.private").write_text("not a key")
    keys.keygen(tmp_path, "example.net", "s1")
    store = keys.KeyStore(tmp_path)
    broken = store.lookup("example.org")
    assert broken is not None and "not a PEM private key" in broken.error and not broken.keys
    assert store.lookup("example.net").keys  # type: ignore[union-attr]
    (tmp_path / "example.net" / "active").write_text("missing\n")
    store.refresh(force=True)
    assert "cannot read" in store.lookup("example.net").error  # type: ignore[union-attr]


def test_opendkim_genkey_files_are_read(tmp_path: Path) -> None:
    """A PKCS#1 key as opendkim-genkey writes it, with an `active` file added."""
    domain_dir = tmp_path / "example.org"
    domain_dir.mkdir()
    key = keys.generate_key("rsa", 1024)
    (domain_dir / "mail.private").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (domain_dir / "active").write_text("# the selector that signs\nmail\n")
    [signing] = keys.KeyStore(tmp_path).lookup("example.org").keys  # type: ignore[union-attr]
    assert (signing.selector, signing.key_type) == ("mail", "rsa")


def test_keygen_refuses_to_overwrite_and_bad_names(tmp_path: Path) -> None:
    keys.keygen(tmp_path, "example.org", "s1")
    with pytest.raises(FileExistsError):
        keys.keygen(tmp_path, "example.org", "s1")
    with pytest.raises(ValueError, match="not a domain"):
        keys.keygen(tmp_path, "../etc", "s1")
    with pytest.raises(ValueError, match="not a selector"):
        keys.keygen(tmp_path, "example.org", "a/b")
    with pytest.raises(ValueError, match="at least 1024"):
        keys.keygen(tmp_path, "example.org", "s2", "rsa", 512)
    with pytest.raises(keys.KeyUnusable):
        keys.activate(tmp_path, "example.org", "nosuch")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--keys-dir", str(tmp_path), "keygen", "example.org", "--selector", "s1"])
    out = capsys.readouterr().out
    assert "name:  s1._domainkey.example.org" in out and "value: v=DKIM1; k=rsa; p=" in out
    assert "signs from now on" in out
    main(["--keys-dir", str(tmp_path), "keygen", "example.org", "--selector", "s2"])
    out = capsys.readouterr().out
    assert "secumail-dkim activate example.org s2" in out
    main(["--keys-dir", str(tmp_path), "activate", "example.org", "s2"])
    assert "now signs with: s2" in capsys.readouterr().out
    main(["--keys-dir", str(tmp_path), "keys"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:4] for line in lines] == [
        ["example.org", "s1", "rsa", "inactive"], ["example.org", "s2", "rsa", "active"]]
    main(["--keys-dir", str(tmp_path), "record", "example.org", "s1"])
    assert "s1._domainkey.example.org. IN TXT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--keys-dir", str(tmp_path), "activate", "example.org", "nosuch"])
    assert exit_info.value.code == 1
    assert "cannot read" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in (tmp_path / "example.org").iterdir())
    assert os.access(tmp_path / "example.org" / "active", os.R_OK)
