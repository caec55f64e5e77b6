"""A real Postfix (Debian's package), run by the tests on loopback in a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import free_port, require_binary, wait_for_port

# Every service as Debian's master.cf has it, chroot off (the tests' resolv.conf is the host's).
MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


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
        (self.config_dir / "master.cf").write_text(listener + MASTER_SERVICES + extra_master)

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
