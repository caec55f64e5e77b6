"""Helpers for the DKIM milter's service tests: the daemon, miltertest scripts, and running
OpenDKIM's and dkimpy's tools with their DNS aimed at the tests' own server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testkit.processes import VENV_BIN, Daemon, free_port, require_binary, wait_for_port

HOSTNAME = "mx.secumail.test"


def dkim_env(port: int, keys_dir: Path, dns: str, **overrides: str) -> dict[str, str]:
    env = {
        "SECUMAIL_DKIM_LISTEN": f"127.0.0.1:{port}",
        "SECUMAIL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "SECUMAIL_DKIM_KEYS_DIR": str(keys_dir),
        "SECUMAIL_DNS_SERVERS": dns,
        "SECUMAIL_DNS_TIMEOUT": "1",
        "SECUMAIL_HOSTNAME": HOSTNAME,
        "SECUMAIL_DRAIN_TIMEOUT": "5",
        "SECUMAIL_LOG_LEVEL": "DEBUG",
    }
    env.update({f"SECUMAIL_{k.upper()}": v for k, v in overrides.items()})
    return env


def start_dkim(env: dict[str, str]) -> Daemon:
    daemon = Daemon([str(VENV_BIN / "secumail-dkim")], env, name="secumail-dkim")
    port = int(env["SECUMAIL_DKIM_LISTEN"].rsplit(":", 1)[1])
    try:
        wait_for_port(port)
    except TimeoutError:
        daemon.stop()
        raise AssertionError("secumail-dkim did not start:\n" + daemon.output()) from None
    return daemon


def keygen(keys_dir: Path, *args: str) -> str:
    """The real command line tool, as an operator runs it."""
    result = subprocess.run(
        [str(VENV_BIN / "secumail-dkim"), "--keys-dir", str(keys_dir), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout


def record_from_output(output: str) -> tuple[str, str]:
    """(name, value) of the TXT record the keygen command printed."""
    name = re.search(r"name:\s+(\S+)", output)
    value = re.search(r"value:\s+(.+)", output)
    assert name and value, output
    return name.group(1), value.group(1).strip()


# --- miltertest ---------------------------------------------------------------------------


@dataclass
class MilterMessage:
    """One message for miltertest to send: headers as (name, value after the colon)."""

    headers: list[tuple[str, str]]
    body: bytes
    client: str = "203.0.113.7"
    auth: str = ""
    sender: str = "sender@remote.test"


@dataclass
class MilterResult:
    reply: str  # the letter of the end-of-message reply: c, a, t, r, y...
    smtp_reply: str = ""  # for "y": which of KNOWN_REPLIES it was
    inserted: dict[str, list[str]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode().split("\n"):
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return headers, body.replace(b"\n", b"\r\n")


def message_from(raw: bytes, **kwargs: str) -> MilterMessage:
    headers, body = split_message(raw)
    return MilterMessage(headers, body, **kwargs)


def _lua(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return '"' + "".join(
        chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in data) + '"'


# miltertest matches a custom SMTP reply only as a whole (code, enhanced code, text).
KNOWN_REPLIES = [
    "451 4.7.5 DKIM temporarily unavailable, try again later",
    "451 4.7.5 DKIM signing temporarily unavailable, try again later",
    "550 5.7.1 Email rejected per DMARC policy for secumail.test",
]


def miltertest_script(port: int, messages: list[MilterMessage], pause: int = 0) -> str:
    """A Lua script for miltertest: one connection, the messages one after the other
    (`pause` seconds before each but the first), and for each the end-of-message reply and
    the header changes, printed between markers."""
    lines = [
        f'conn = mt.connect("inet:{port}@127.0.0.1", 10, 0.2)',
        'if conn == nil then error("cannot connect") end',
        'if mt.negotiate(conn, nil, nil, nil) ~= nil then error("negotiate failed") end',
        # miltertest puts back the space after the colon itself (with or without
        # SMFIP_HDR_LEADSPC): values go without it.
        "function hdr(name, value)",
        '  value = string.gsub(value, "^ ", "", 1)',
        '  if mt.header(conn, name, value) ~= nil then error("header failed") end',
        "end",
    ]
    for number, message in enumerate(messages):
        if number and pause:
            lines += [f"mt.sleep({pause})", 'mt.echo("@@PAUSED")']
        lines += [
            f'mt.macro(conn, SMFIC_CONNECT, "j", "{HOSTNAME}")',
            f'if mt.conninfo(conn, "client.test", "{message.client}") ~= nil then'
            ' error("conninfo failed") end' if number == 0 else "",
        ]
        if message.auth:
            lines.append(f'mt.macro(conn, SMFIC_MAIL, "{{auth_authen}}", {_lua(message.auth)})')
        lines.append(f'if mt.mailfrom(conn, {_lua(message.sender)}) ~= nil then'
                     ' error("mailfrom failed") end')
        for name, value in message.headers:
            lines.append(f"hdr({_lua(name)}, {_lua(value)})")
        lines += [
            'if mt.eoh(conn) ~= nil then error("eoh failed") end',
            f'if mt.bodystring(conn, {_lua(message.body)}) ~= nil then error("body failed") end',
            'if mt.eom(conn) ~= nil then error("eom failed") end',
            f'mt.echo("@@MESSAGE {number} reply=" .. string.char(mt.getreply(conn)))',
        ]
        for reply in KNOWN_REPLIES:
            code, enhanced, text = reply.split(" ", 2)
            lines.append(f'if mt.eom_check(conn, MT_SMTPREPLY, "{code}", "{enhanced}", '
                         f'"{text}") then mt.echo("@@SMTP {reply}@@") end')
        for header in ("DKIM-Signature", "Authentication-Results"):
            lines += [
                f'if mt.eom_check(conn, MT_HDRDELETE, "{header}") then '
                f'mt.echo("@@DELETED {header}") end',
                "for n = 0, 9 do",
                f'  local value = mt.getheader(conn, "{header}", n)',
                "  if value == nil then break end",
                f'  mt.echo("@@HEADER {header}@@" .. value .. "@@END")',
                "end",
            ]
    lines.append("mt.disconnect(conn)")
    return "\n".join(line for line in lines if line) + "\n"


def run_miltertest(port: int, messages: list[MilterMessage], pause: int = 0
                   ) -> list[MilterResult]:
    binary = require_binary("miltertest")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(miltertest_script(port, messages, pause))
    try:
        result = subprocess.run([binary, "-s", script.name], capture_output=True, text=True,
                                timeout=60)
    finally:
        os.unlink(script.name)
    assert result.returncode == 0, f"miltertest failed:\n{result.stdout}\n{result.stderr}"
    results: list[MilterResult] = []
    for chunk in result.stdout.split("@@MESSAGE ")[1:]:
        match = re.match(r"\d+ reply=(.)", chunk)
        assert match, chunk
        outcome = MilterResult(match.group(1))
        smtp = re.search(r"@@SMTP (.*?)@@", chunk)
        outcome.smtp_reply = smtp.group(1) if smtp else ""
        for name, value in re.findall(r"@@HEADER ([\w-]+)@@(.*?)@@END", chunk, re.S):
            outcome.inserted.setdefault(name, []).append(value)
        outcome.deleted = re.findall(r"@@DELETED ([\w-]+)", chunk)
        results.append(outcome)
    assert len(results) == len(messages), result.stdout
    return results


def signed_message(message: MilterMessage, result: MilterResult) -> bytes:
    """The message as an MTA would pass it on: the inserted headers on top, CRLF."""
    added = [(name, value) for name, values in result.inserted.items() for value in values]
    lines = [f"{name}:{value}".replace("\n", "\r\n") for name, value in added]
    lines += [f"{name}:{value}".replace("\n", "\r\n") for name, value in message.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + message.body


# --- other tools, their DNS aimed at the tests' server ------------------------------------


def require_root_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give a tool its own /etc/resolv.conf")


def run_with_resolver(argv: list[str], nameserver: str, stdin: bytes,
                      ) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` in a private mount namespace whose /etc/resolv.conf names `nameserver`
    (port 53): tools that read only resolv.conf (libresolv, dnspython) then ask the tests'
    DNS server and nothing else; the host's resolv.conf is left alone."""
    require_root_namespaces()
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    os.chmod(conf.name, 0o644)
    try:
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf.name, *argv],
            input=stdin, capture_output=True, timeout=60,
        )
    finally:
        os.unlink(conf.name)


def start_opendkim(workdir: Path, port: int, domain: str, selector: str, key_file: Path,
                   nameserver: str, canonicalization: str = "relaxed/relaxed",
                   test_dns: dict[str, str] | None = None) -> Daemon:
    """OpenDKIM's milter (Debian's opendkim), signing for `domain` what comes from
    127.0.0.1 and verifying the rest, asking `nameserver` (port 53) for keys, or reading
    them from `test_dns` (OpenDKIM's TestDNSData) when given."""
    binary = require_binary("opendkim")
    # Debian's opendkim resolves through libunbound, which by default never asks an address
    # of 127.0.0.0/8 and answers NXDOMAIN itself for the special-use .test: its own
    # configuration file lifts both and forwards every query to the tests' server.
    unbound = workdir / "unbound.conf"
    unbound.write_text(
        'server:\n    do-not-query-localhost: no\n    local-zone: "test." nodefault\n'
        f'forward-zone:\n    name: "."\n    forward-addr: {nameserver}@53\n'
    )
    if test_dns:
        # libunbound's configuration parser is not thread-safe: OpenDKIM, which loads the
        # file for every message, then tempfails some of concurrent ones. Under load, the
        # keys come from a file instead.
        resolver = f"TestDNSData file:{_test_dns_file(workdir, test_dns)}\n"
    else:
        resolver = f"ResolverConfiguration {unbound}\n"
    config = workdir / "opendkim.conf"
    config.write_text(
        "Syslog no\n"
        f"Socket inet:{port}@127.0.0.1\n"
        "Mode sv\n"
        f"Domain {domain}\nKeyFile {key_file}\nSelector {selector}\n"
        "SignatureAlgorithm rsa-sha256\n"
        f"Canonicalization {canonicalization}\n"
        "InternalHosts 127.0.0.1\n"
        f"{resolver}"
        "AlwaysAddARHeader yes\n"
        # The tests' folders are under /tmp, which OpenDKIM's file checks call unsafe.
        "RequireSafeKeys false\n"
        f"PidFile {workdir / 'opendkim.pid'}\n"
    )
    daemon = Daemon([binary, "-f", "-x", str(config)], name="opendkim")
    try:
        wait_for_port(port)
    except TimeoutError:
        daemon.stop()
        raise AssertionError("opendkim did not start:\n" + daemon.output()) from None
    return daemon


def _test_dns_file(workdir: Path, records: dict[str, str]) -> Path:
    path = workdir / "opendkim-dns.txt"
    path.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
    return path
