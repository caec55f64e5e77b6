"""The real secumail-dkim daemon, driven by peers nobody here wrote: OpenDKIM's miltertest
speaks the milter protocol to it; OpenDKIM's opendkim-testmsg and dkimpy's dkimverify check
its signatures; OpenDKIM signs what it verifies. Every DNS lookup, theirs and ours, goes to
the tests' own DNS server on a loopback address."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.dkim import (
    MilterResult,
    dkim_env,
    keygen,
    message_from,
    record_from_output,
    require_root_namespaces,
    run_miltertest,
    run_with_resolver,
    signed_message,
    start_dkim,
    start_opendkim,
)
from testkit.dnsserver import LoopbackDNS
from testkit.processes import VENV_BIN, Daemon, free_port, require_binary

DNS_ADDRESS = "127.53.0.1"  # port 53, so that tools reading /etc/resolv.conf can use it
UNIT_DATA = Path(__file__).parents[1] / "unit" / "data"

OUTBOUND = (
    b"From: Alice <alice@secumail.test>\r\nTo: Bob <bob@remote.test>\r\n"
    b"Subject: =?utf-8?q?r=C3=A9union?= de\r\n  service\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <1@secumail.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Bonjour Bob,\r\n\r\n  la r\xc3\xa9union est \xc3\xa0 10h.  \r\n\r\n\r\n"
)


def txt(value: str) -> str:
    """A TXT record in zone syntax, cut into character-strings of 255 bytes at most."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


@dataclass
class World:
    dns: LoopbackDNS
    keys_dir: Path
    port: int
    daemon: Daemon

    def publish(self, keygen_output: str) -> None:
        name, value = record_from_output(keygen_output)
        self.dns.add(name, "TXT", txt(value))


def start_world(tmp_path: Path, **overrides: str) -> Iterator[World]:
    require_root_namespaces()
    try:
        dns = LoopbackDNS(DNS_ADDRESS, 53).start()
    except OSError as error:
        pytest.skip(f"cannot listen on {DNS_ADDRESS}:53 ({error})")
    keys_dir = tmp_path / "keys"
    for output in (keygen(keys_dir, "keygen", "secumail.test", "--selector", "s1"),
                   keygen(keys_dir, "keygen", "secumail.test", "--selector", "e1",
                          "--type", "ed25519")):
        name, value = record_from_output(output)
        dns.add(name, "TXT", txt(value))
    dns.add("_dmarc.secumail.test", "TXT", '"v=DMARC1; p=reject"')
    port = free_port()
    daemon = start_dkim(dkim_env(port, keys_dir, f"{DNS_ADDRESS}:53", **overrides))
    world = World(dns, keys_dir, port, daemon)
    yield world
    world.daemon.stop()
    dns.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from start_world(tmp_path)


def sign_with_secumail(world: World, raw: bytes = OUTBOUND) -> bytes:
    message = message_from(raw, client="127.0.0.1", sender="alice@secumail.test")
    [result] = run_miltertest(world.port, [message])
    assert result.reply == "c"
    assert len(result.inserted["DKIM-Signature"]) == 2
    return signed_message(message, result)


def dkimverify(world: World, message: bytes, index: int) -> subprocess.CompletedProcess[bytes]:
    return run_with_resolver([str(VENV_BIN / "dkimverify"), "--index", str(index)],
                             DNS_ADDRESS, message)


def opendkim_testmsg(world: World, message: bytes) -> subprocess.CompletedProcess[bytes]:
    return run_with_resolver([require_binary("opendkim-testmsg")], DNS_ADDRESS, message)


# --- signing -------------------------------------------------------------------------------


def test_secumail_signature_verifies_with_dkimverify_and_opendkim(world: World) -> None:
    signed = sign_with_secumail(world)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b"a=ed25519-sha256" in signed.split(b"\r\n\r\n")[0]
    for index in (0, 1):  # RSA, then Ed25519 (RFC 8463)
        checked = dkimverify(world, signed, index)
        assert checked.stdout.strip() == b"signature ok", checked
    checked = opendkim_testmsg(world, signed)
    assert checked.returncode == 0 and checked.stdout == b"", checked
    broken = signed.replace(b"10h", b"11h")
    refused = dkimverify(world, broken, 0)  # dkimverify exits on an exception here
    assert refused.returncode != 0 and b"body hash mismatch" in refused.stderr, refused
    rejected = opendkim_testmsg(world, broken)
    assert rejected.returncode != 0, rejected


def test_authenticated_sender_is_signed_and_unknown_domain_is_not(world: World) -> None:
    other = OUTBOUND.replace(b"alice@secumail.test", b"alice@elsewhere.test")
    results = run_miltertest(world.port, [
        message_from(OUTBOUND, client="198.51.100.20", auth="alice"),
        message_from(other, client="198.51.100.20", auth="alice"),
    ])
    assert len(results[0].inserted["DKIM-Signature"]) == 2
    assert results[1].inserted == {} and results[1].reply == "c"


def test_rotation_switches_selector_while_running(world: World) -> None:
    output = keygen(world.keys_dir, "keygen", "secumail.test", "--selector", "s2")
    assert "secumail-dkim activate secumail.test s2" in output  # staged, not signing yet
    world.publish(output)
    assert b"s=s1;" in sign_with_secumail(world)
    keygen(world.keys_dir, "activate", "secumail.test", "s2")
    time.sleep(1.2)  # the milter looks at the keys folder at most once a second
    signed = sign_with_secumail(world)
    assert b"s=s2;" in signed and b"s=s1;" not in signed
    assert dkimverify(world, signed, 0).stdout.strip() == b"signature ok"


# --- verifying -----------------------------------------------------------------------------


def verify_with_secumail(world: World, raw: bytes, **kwargs: str) -> str:
    [result] = run_miltertest(world.port, [message_from(raw, **kwargs)])
    assert result.reply == "c", result
    [value] = result.inserted["Authentication-Results"]
    return value


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_opendkim_milter_signature_verifies_with_secumail(
    world: World, tmp_path: Path, canonicalization: str
) -> None:
    subprocess.run([require_binary("opendkim-genkey"), "-D", str(tmp_path), "-d",
                    "remote.test", "-s", "od", "-b", "2048"], check=True, timeout=60)
    record = (tmp_path / "od.txt").read_text()
    world.dns.add("od._domainkey.remote.test", "TXT", txt("".join(record.split('"')[1::2])))
    port = free_port()
    opendkim = start_opendkim(tmp_path, port, "remote.test", "od", tmp_path / "od.private",
                              DNS_ADDRESS, canonicalization)
    try:
        unsigned = message_from(OUTBOUND.replace(b"alice@secumail.test", b"carol@remote.test"),
                                client="127.0.0.1")
        [signing] = run_miltertest(port, [unsigned])
    finally:
        opendkim.stop()
    [opendkim_signature] = signing.inserted["DKIM-Signature"]
    assert f"c={canonicalization}" in opendkim_signature
    result = verify_with_secumail(world, signed_message(unsigned, signing))
    assert "dkim=pass (2048-bit rsa key) header.d=remote.test" in result, result


def test_opendkim_testmsg_signature_is_rsa_sha1_and_refused(world: World,
                                                            tmp_path: Path) -> None:
    """opendkim-testmsg still signs with rsa-sha1, which RFC 8301 forbids verifiers to
    accept: SecuMail reports it as permerror with the reason."""
    subprocess.run([require_binary("opendkim-genkey"), "-D", str(tmp_path), "-d",
                    "remote.test", "-s", "od"], check=True, timeout=60)
    signed = subprocess.run(
        [require_binary("opendkim-testmsg"), "-d", "remote.test", "-k",
         str(tmp_path / "od.private"), "-s", "od", "-C"],
        input=OUTBOUND, capture_output=True, check=True, timeout=60).stdout
    assert b"a=rsa-sha1;" in signed.split(b"\r\n\r\n")[0]
    result = verify_with_secumail(world, signed)
    assert 'dkim=permerror reason="rsa-sha1 signatures are not accepted any more' in result


def test_rfc8463_example_verifies_through_the_milter(world: World) -> None:
    world.dns.add("brisbane._domainkey.football.example.com", "TXT",
                  '"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="')
    world.dns.add("test._domainkey.football.example.com", "TXT", txt(
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a"
        "5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM"
        "3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB"))
    result = verify_with_secumail(world, (UNIT_DATA / "rfc8463_appendix_a.eml").read_bytes())
    entries = result.split(";\n\t")
    assert entries[1].startswith("dkim=pass (256-bit ed25519 key) header.d=football.example.com")
    assert entries[2].startswith("dkim=pass (1024-bit rsa key) header.d=football.example.com")


def test_rfc6376_example_verifies_through_the_milter(world: World) -> None:
    world.dns.add("brisbane._domainkey.example.com", "TXT", txt(
        "v=DKIM1; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDwIRP/UC3SBsEmGqZ9ZJW3/DkMoGeLnQg1fWn"
        "7/zYtIxN2SnFCjxOCKG9v3b4jYfcTNh5ijSsq631uBItLa7od+v/RtdC2UzJ1lWT947qR+Rcac2gbto/NMqJ0f"
        "zfVjH4OuKhitdY9tf6mcwGjaNBcWToIMmPSPDdQPNUYckcQ2QIDAQAB"))
    result = verify_with_secumail(world, (UNIT_DATA / "rfc6376_appendix_a.eml").read_bytes())
    assert "dkim=pass (1024-bit rsa key) header.d=example.com header.i=joe@football" in result


def test_inbound_secumail_signed_mail_passes_and_tampered_fails(world: World) -> None:
    signed = sign_with_secumail(world)
    result = verify_with_secumail(world, signed)
    assert result.startswith(" mx.secumail.test;\n\tdkim=pass (2048-bit rsa key)")
    assert "dkim=pass (256-bit ed25519 key)" in result
    assert "dmarc=pass (p=reject dis=none) header.from=secumail.test" in result
    tampered = verify_with_secumail(world, signed.replace(b"10h", b"11h"))
    assert tampered.count('dkim=fail') == 2 and "body hash did not verify" in tampered
    assert "dmarc=fail (p=reject dis=reject)" in tampered


def test_several_messages_on_one_connection_and_forged_results(world: World) -> None:
    signed = sign_with_secumail(world)
    forged = b"Authentication-Results: mx.secumail.test; dkim=pass header.d=bank.test\r\n"
    results = run_miltertest(world.port, [
        message_from(signed), message_from(forged + OUTBOUND), message_from(signed),
    ])
    assert [r.reply for r in results] == ["c", "c", "c"]
    assert "dkim=pass" in results[0].inserted["Authentication-Results"][0]
    assert results[1].deleted == ["Authentication-Results"]
    assert "dkim=none" in results[1].inserted["Authentication-Results"][0]
    assert "dkim=pass" in results[2].inserted["Authentication-Results"][0]


def test_dmarc_reject_refuses_a_failing_message(tmp_path: Path) -> None:
    for world in start_world(tmp_path, dmarc_reject="true"):
        spoofed = OUTBOUND.replace(b"Subject:", b"X-Note: no signature\r\nSubject:")
        [result] = run_miltertest(world.port, [message_from(spoofed)])
        assert result.reply == "y"
        assert result.smtp_reply == "550 5.7.1 Email rejected per DMARC policy for secumail.test"
        assert result.inserted == {}  # a refused message gets no header
        assert world.daemon.logged("action=reject")


# --- failures --------------------------------------------------------------------------------


def test_dns_timeout_is_a_tempfail_and_the_milter_keeps_serving(world: World) -> None:
    world.dns.make_slow("slow.test")
    slow = sign_with_secumail(world).replace(b"d=secumail.test", b"d=slow.test")
    [result] = run_miltertest(world.port, [message_from(slow)])
    assert result.reply == "y"
    assert result.smtp_reply == "451 4.7.5 DKIM temporarily unavailable, try again later"
    assert world.daemon.logged("DNS temporary failure")
    assert sign_with_secumail(world)  # still serving


def test_fail_open_accepts_on_dns_timeout_and_malformed_packets(tmp_path: Path) -> None:
    for world in start_world(tmp_path, dkim_fail_open="true"):
        world.dns.make_slow("slow.test")
        slow = sign_with_secumail(world).replace(b"d=secumail.test", b"d=slow.test")
        result = verify_with_secumail(world, slow)
        assert "dkim=temperror" in result
        with socket.create_connection(("127.0.0.1", world.port), timeout=5) as conn:
            conn.sendall(b"\x00\x00\x00\x01Z")
            assert conn.recv(100) == b"\x00\x00\x00\x01a"  # accept, then closed
        assert world.daemon.logged("answer=accept")


def test_missing_key_is_a_tempfail_with_a_clear_log_line(world: World) -> None:
    (world.keys_dir / "secumail.test" / "s1.private").unlink()
    time.sleep(1.2)
    [result] = run_miltertest(world.port, [message_from(OUTBOUND, client="127.0.0.1")])
    assert result.reply == "y"
    assert result.smtp_reply == "451 4.7.5 DKIM signing temporarily unavailable, try again later"
    assert world.daemon.logged("signing key unusable")
    assert "s1.private" in world.daemon.output()


def test_malformed_packets_get_a_tempfail_and_the_milter_keeps_serving(world: World) -> None:
    for garbage in (b"\x00\x00\x00\x01Z", b"\xff\xff\xff\xff", b"\x00\x00\x00\x03Chost"):
        with socket.create_connection(("127.0.0.1", world.port), timeout=5) as conn:
            conn.sendall(garbage)
            assert conn.recv(100) == b"\x00\x00\x00\x01t"  # tempfail, then closed
            assert conn.recv(100) == b""
    assert world.daemon.logged("malformed milter packet")
    assert "dkim=none" in verify_with_secumail(world, OUTBOUND)


def test_sigterm_stops_the_milter_cleanly(world: World) -> None:
    assert world.daemon.stop() == 0
    assert "stopped" in world.daemon.output()


def test_a_draining_milter_finishes_the_sessions_it_holds(world: World) -> None:
    """Issue 32: a restarted milter cut Postfix's open sessions (`can't read
    SMFIC_BODYEOB reply packet header: Broken pipe`), whose next messages all got 451. A
    draining milter takes no new connection (Postfix goes to another replica) but serves
    the ones it has until Postfix ends them."""
    message = message_from(OUTBOUND, client="127.0.0.1", sender="alice@secumail.test")
    results: list[list[MilterResult]] = []
    session = threading.Thread(target=lambda: results.append(
        run_miltertest(world.port, [message, message], pause=3)))
    session.start()
    time.sleep(1.5)  # the first message is done; the session waits for the second
    world.daemon.proc.send_signal(signal.SIGTERM)
    assert world.daemon.logged("draining", timeout=5)
    with pytest.raises(OSError):  # no new connection while draining
        socket.create_connection(("127.0.0.1", world.port), timeout=2).close()
    session.join(30)
    assert [r.reply for r in results[0]] == ["c", "c"]
    assert len(results[0][1].inserted["DKIM-Signature"]) == 2  # signed while draining
    assert world.daemon.proc.wait(10) == 0  # and it stops once the session has ended


def test_idle_and_trickled_milter_connections_are_dropped(tmp_path: Path) -> None:
    """Issue 13, item 7: the milter had no idle deadline (a silent peer held a connection
    for ever) nor one for a packet sent a byte at a time."""
    for world in start_world(tmp_path, dkim_idle_timeout="1", request_timeout="1"):
        port = world.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            idle.settimeout(5)
            assert idle.recv(1) == b""  # closed after a second of silence
        assert world.daemon.logged("nothing received for 1 s")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # A packet of 1,000 bytes begun, never finished.
            sock.sendall((1000).to_bytes(4, "big") + b"O")
            closed = False
            for _ in range(24):
                try:
                    sock.sendall(b"\0")
                except OSError:
                    closed = True
                    break
                time.sleep(0.25)
            assert closed
        assert world.daemon.logged("a request still unfinished after 1 s")



def test_the_running_milter_rotates_its_key_once_the_successor_is_published(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    """Issue 33: SECUMAIL_DKIM_ROTATE_DAYS in the real process, DNS from the tests' server:
    a successor is made for the 100-day-old key, waits for its record, then signs."""
    import os

    from secumail import dkim_keys
    from testkit.processes import scrape

    keys_dir = tmp_path / "keys"
    keygen(keys_dir, "keygen", "secumail.test", "--selector", "old", "--bits", "1024")
    then = time.time() - 100 * 86400
    os.utime(keys_dir / "secumail.test" / "old.private", (then, then))
    port = free_port()
    env = dkim_env(port, keys_dir, dns_server.spec, dkim_rotate_days="90",
                   dkim_rotate_check="0.3")
    daemon = start_dkim(env)
    try:
        deadline = time.monotonic() + 30
        while len(listed := dkim_keys.list_keys(keys_dir)) < 2:
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.2)
        [successor] = [k for k in listed if k.selector != "old"]
        assert not successor.active and successor.key_type == "rsa"
        assert daemon.logged("publish the successor's record")
        time.sleep(1)  # a few looks: no record, no switch
        assert dkim_keys.read_active(keys_dir / "secumail.test") == ["old"]
        value = successor.record_value
        dns_server.add(successor.record_name, "TXT",
                       " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255)))
        while dkim_keys.read_active(keys_dir / "secumail.test") != [successor.selector]:
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.2)
        metrics_port = int(env["SECUMAIL_METRICS_LISTEN"].rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while "secumail_dkim_key_rotations_total 1.0" not in scrape(metrics_port):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert daemon.logged("dkim key rotated: the successor signs")
        assert len(dkim_keys.list_keys(keys_dir)) == 2  # no third key
    finally:
        daemon.stop()
