"""A real Postfix (Debian's package), run by the tests on loopback in a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from secumail.settings import Settings
from services.postfix.render import (
    main_cf,
    reinjection_options,
    scan_transport,
    smtp_options,
    standard_services,
)
from testkit.processes import free_port, require_binary, wait_for_port


class PostfixInstance:
    """`main` holds main.cf settings; the SMTP listener is on 127.0.0.1:`port`."""

    def __init__(self, main: dict[str, str], extra_master: str = "",
                 listener_options: list[str] | None = None) -> None:
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
        listener = f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + "".join(
            f"  -o {option}\n" for option in listener_options or [])
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

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """The log once it holds `text` (Postfix writes its log a moment after it answers)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the Postfix log:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self.log()

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


def filtering_postfix(mode: str, filter_port: int, reinjection: int, sink_port: int,
                      milter: str = "", processes: int = 16, **extra: str) -> PostfixInstance:
    """A Postfix in front of the filters, its filtering options rendered by
    services/postfix/render.py as in production (but on loopback); `extra` main.cf
    settings on top."""
    settings = Settings(filter_mode=mode,
                        content_filter_address=f"127.0.0.1:{filter_port}", relay_timeout=30)
    rendered = main_cf(settings)
    main: dict[str, str] = {
        **sink_transport(sink_port),
        **extra,
        "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
        **{k: rendered[k] for k in ("content_filter", "receive_override_options")
           if k in rendered},
    }
    if milter:
        main.update({"smtpd_milters": f"inet:{milter}", "milter_default_action": "tempfail"})
    loopback = ("mynetworks=", "smtpd_authorized_xforward_hosts=")
    options = [o if not o.startswith(loopback) else o.split("=", 1)[0] + "=127.0.0.0/8"
               for o in reinjection_options(settings)]
    master = f"127.0.0.1:{reinjection} inet n - n - {processes} smtpd\n" + "".join(
        f"  -o {o}\n" for o in options)
    if mode == "after-queue":
        master = "\n".join(scan_transport(processes)) + "\n" + master
    return PostfixInstance(main, extra_master=master, listener_options=smtp_options(settings))
