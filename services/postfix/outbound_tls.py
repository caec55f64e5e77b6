"""MTA-STS (RFC 8461) for the mail Postfix sends to other domains.

A domain with an MTA-STS policy in `enforce` mode asks senders for TLS with a certificate
valid for one of its MX names: a sender that knows the policy defers the mail when STARTTLS
is missing (stripped on the path) or the certificate is wrong, instead of sending it in
clear. Postfix asks a socketmap for each destination's policy (`smtp_tls_policy_maps`);
postfix-mta-sts-resolver, the daemon Mailu uses too, answers it: it looks up the
`_mta-sts` TXT record, fetches the policy over HTTPS (the CAs of
SECUMAIL_OUTBOUND_TLS_CA_FILE), keeps it for its max_age, and answers `secure
match=<mx>...` for `enforce` (nothing for `testing` and `none`, which are not enforced).

The supervisor keeps the daemon running on 127.0.0.1 (only Postfix asks it), as a user of
its own; it resolves through the container's resolv.conf, so SECUMAIL_DNS_SERVERS applies.
DANE needs no daemon: Postfix's own `dane` level, with a DNSSEC-validating resolver.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secumail.logs import log_event
from secumail.mta_sts import policy_lines
from secumail.netaddr import HostPort
from secumail.settings import Settings
from secumail.tlsrpt import Policy
from services.postfix.children import CommandKeeper, in_container

log = logging.getLogger("secumail.postfix.mta_sts")

LISTEN = HostPort("127.0.0.1", 8461)
CONFIG = Path("/etc/postfix/mta-sts-daemon.yml")
# The policies, kept on a volume of their own (RFC 8461 10.2): an attacker who blocks the
# policy host while Postfix restarts or upgrades finds them still known, and still enforced.
CACHE = Path("/var/lib/secumail/mta-sts/policies.sqlite")
# A user of its own: it fetches from the Internet, so nothing else of the container's may
# be touched by it, nor it by anything else.
STS_UID = 5054
TIMEOUT = 4  # seconds for the TXT lookup, and again for the HTTPS fetch


def policy_map(settings: Settings) -> str:
    """Postfix's smtp_tls_policy_maps: the daemon's socketmap, or nothing."""
    return f"socketmap:inet:{LISTEN}:postfix" if settings.outbound_mta_sts else ""


def daemon_config(cache: Path = CACHE) -> str:
    """The daemon's configuration (YAML; JSON is YAML): policies kept in `cache`, each
    until its max_age; `testing` policies not enforced (RFC 8461 5); servername=hostname:
    the MX name is sent as SNI."""
    return json.dumps({
        "host": LISTEN.host, "port": LISTEN.port, "reuse_port": True,
        "shutdown_timeout": 5,
        "cache": {"type": "sqlite", "options": {"filename": str(cache), "threads": 1}},
        "default_zone": {"strict_testing": False, "timeout": TIMEOUT, "require_sni": True,
                         "tlsrpt": False},
    }, indent=2) + "\n"


def start_sts_resolver(settings: Settings, config: Path = CONFIG, cache: Path = CACHE,
                       user: int | None = STS_UID) -> CommandKeeper | None:
    """The daemon, kept running (None when SECUMAIL_OUTBOUND_MTA_STS is off, and beside
    the tests' own Postfix)."""
    if not settings.outbound_mta_sts or not in_container():
        return None
    config.write_text(daemon_config(cache))
    level = "debug" if settings.log_level == "DEBUG" else "info"
    # SSL_CERT_FILE: OpenSSL's default CAs for the policy fetch (aiohttp's default context).
    env = {**os.environ, "SSL_CERT_FILE": settings.outbound_tls_ca_file}
    keeper = CommandKeeper("MTA-STS resolver", ["mta-sts-daemon", "-v", level, "-c",
                                                str(config)], user, env=env)
    keeper.start()
    log_event(log, "MTA-STS policies of destinations enforced", resolver=str(LISTEN),
              ca_file=settings.outbound_tls_ca_file)
    return keeper


def sts_policy(pol_body: dict[str, Any]) -> Policy:
    """An MTA-STS policy as postfix-mta-sts-resolver keeps it (its JSON), as a TLS report
    names it; mode none is no policy (RFC 8461 5)."""
    mode = pol_body.get("mode")
    if mode not in ("enforce", "testing"):
        return Policy()
    mx = tuple(str(m) for m in pol_body.get("mx", []))
    return Policy("sts", tuple(policy_lines(mode, mx, pol_body.get("max_age", ""))), mx)


REMEMBER_POLICY = 60.0  # seconds a policy read for a TLS report is used again, unread
REMEMBERED_POLICIES = 10_000


def cached_policies(cache: Path = CACHE, clock: Callable[[], float] = time.time
                    ) -> Callable[[str], Policy]:
    """The MTA-STS policy the resolver keeps for a domain (its SQLite cache, read only), as
    a TLS report names it: no policy when it has none, or only an expired one. Each answer
    is kept a minute in memory: a read costs more than the rest of a session's counting."""
    connection: list[sqlite3.Connection] = []
    known: dict[str, tuple[float, Policy]] = {}

    def policy_of(domain: str) -> Policy:
        now = clock()
        if (found := known.get(domain)) is not None and found[0] > now:
            return found[1]
        if len(known) >= REMEMBERED_POLICIES:
            known.clear()
        policy = read(domain, now)
        known[domain] = (now + REMEMBER_POLICY, policy)
        return policy

    def read(domain: str, now: float) -> Policy:
        try:
            if not connection:
                connection.append(sqlite3.connect(f"file:{cache}?mode=ro", uri=True,
                                                  timeout=1, check_same_thread=False))
            found = connection[0].execute(
                "SELECT ts, pol_body FROM sts_policy_cache WHERE domain = ?",
                (domain,)).fetchone()
            if found is None:
                return Policy()
            body = json.loads(found[1])
            if int(found[0]) + int(body.get("max_age", 0)) < now:
                return Policy()
            return sts_policy(body)
        except (sqlite3.Error, ValueError, TypeError, AttributeError) as error:
            connection.clear()  # no cache yet (no policy fetched), or a bad row: asked again
            log_event(log, "MTA-STS policy not read for a TLS report", logging.DEBUG,
                      domain=domain, error=f"{type(error).__name__}: {error}")
            return Policy()

    return policy_of
