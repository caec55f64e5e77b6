"""A real Postfix (Debian's package), run by the tests on loopback in a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from services.postfix.render import standard_services
from tests.support.processes import free_port, require_binary, wait_for_port


class PostfixInstance:
    """`main` holds main.cf settings; the SMTP listener is on 127.0.0.1:`port`."""

    def __init__(self, main: dict[str, str], extra_master: str = "") -> None:
        self.binary = require_binary("postfix")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="secumail-postfix-"))
        os.chmod(self.root, 0o755)  # the postfix user must reach its queue
        self.config_dir = self.root / "etc"
        self.config_dir.mkdir()
        self.maillog = self.root / "maillog"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.root / "queue"),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.secumail.test",
            "mydomain": "secumail.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "alias_maps": "",
            "alias_database": "",
            "smtp_dns_support_level": "disabled",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            **main,
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        listener = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + standard_services() + extra_master)

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> PostfixInstance:
        (self.root / "queue").mkdir(exist_ok=True)
        self.postfix("set-permissions", "create-missing")
        result = self.postfix("start")
        if result.returncode != 0:
            raise AssertionError(
                f"postfix start failed: {result.stdout}{result.stderr}{self.log()}"
            )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self.postfix("stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def queue_ids(self) -> list[str]:
        result = subprocess.run(
            ["postqueue", "-c", str(self.config_dir), "-j"], capture_output=True, text=True
        )
        return [line for line in result.stdout.splitlines() if line.strip()]


def sink_transport(port: int, domain: str = "secumail.test") -> dict[str, str]:
    """main.cf settings that hand every mail for `domain` to an SMTP sink on loopback."""
    return {
        "relay_domains": domain,
        "transport_maps": f"inline:{{ {domain}=smtp:[127.0.0.1]:{port} }}",
    }
