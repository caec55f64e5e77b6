"""Every SECUMAIL_* setting, in one place: names, defaults, validation.

Each service calls `load_settings()` once at start. A bad value stops the service with a
message naming the environment variable, instead of failing later in the middle of a mail.
The same fields are listed, with their defaults, in `.env.example`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from secumail.access import split_entries
from secumail.netaddr import HostPort, IPAddress, Network, parse_host_port, parse_network
from secumail.outbound import DEFAULT_OUTBOUND_LIMITS, Limit, parse_limits
from secumail.quarantine import QuarantineLimits

ENV_PREFIX = "SECUMAIL_"
# Docker Swarm hands secrets to a container as files here: any setting may come from one,
# named as its variable in lower case (secumail_admin_token), when no variable sets it.
SECRETS_DIR = "/run/secrets"
# What compose itself reads, from .env (section 1 of .env.example): in secumail.env they
# would do nothing, silently (compose hands the containers its own values).
COMPOSE_VARIABLES = frozenset({
    "SECUMAIL_SMTP_PUBLISH", "SECUMAIL_SMTP_PUBLISH6", "SECUMAIL_GATEWAY_PUBLISH",
    "SECUMAIL_PROMETHEUS_PUBLISH", "SECUMAIL_BACKUP_DIR", "SECUMAIL_EDGE_SUBNET",
    "SECUMAIL_EDGE_SUBNET6",
    "SECUMAIL_MAIL_SUBNET", "SECUMAIL_FILTER_SUBNET", "SECUMAIL_SCANNERS_SUBNET",
    "SECUMAIL_CLAMAV_REPLICAS", "SECUMAIL_SPAMD_REPLICAS", "SECUMAIL_DKIM_REPLICAS",
    "SECUMAIL_CLAMAV_MIRROR", "SECUMAIL_CLAMAV_SIGNATURES", "SECUMAIL_SA_UPDATE",
    "SECUMAIL_SA_UPDATE_MIRROR",
    "COMPOSE_PROFILES", "COMPOSE_FILE", "SECUMAIL_ADMIN_TOKEN", "SECUMAIL_METRICS_TOKEN",
})


# Settings an earlier version called otherwise: the old name keeps working, so that an
# upgrade never breaks a site's secumail.env, and each service says the new name at start.
RENAMED = {
    "SECUMAIL_SPAMD_ADDRESS": "SECUMAIL_SPAMASSASSIN_ADDRESS",
}
# Settings that took over part of what an older one meant (new -> old): a site that set the
# old one keeps its value for both until it sets the new one.
SPLIT = {
    "SECUMAIL_SCANNER_TIMEOUT": "SECUMAIL_RELAY_TIMEOUT",  # it covered clamd and spamd too
    "SECUMAIL_DKIM_ANSWER_TIMEOUT": "SECUMAIL_REQUEST_TIMEOUT",  # the milter's answer too
}


def carry_renamed(environ: MutableMapping[str, str]) -> list[str]:
    """Give each old name's value to its new name (unless that is set too); one line each,
    naming the new name, for the service's log."""
    notes = []
    for old, new in RENAMED.items():
        if old not in environ:
            continue
        if new in environ:
            notes.append(f"{old} is ignored: {new}, its new name, is set too; remove {old}")
        else:
            environ[new] = environ[old]
            notes.append(f"{old} is now called {new}; it still works, rename it in "
                         "secumail.env")
    for new, old in SPLIT.items():
        if old in environ and new not in environ:
            environ[new] = environ[old]
            notes.append(f"{new} is new and takes {old}'s value ({environ[old]}), as {old} "
                         f"meant it too before; set {new} in secumail.env to part them")
    return notes


def misplaced_in_env_file(text: str) -> list[str]:
    """The variables of an env file (secumail.env) that only compose reads, from .env."""
    names = (line.split("=", 1)[0].strip() for line in text.splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return sorted({name for name in names if name in COMPOSE_VARIABLES})

CommaList = Annotated[list[str], NoDecode]
_LOCAL_PART = re.compile(r"^([a-z0-9][a-z0-9._+-]{0,63})?$")  # empty: @domain catch-all
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", re.I)


def _split_commas(value: object) -> object:
    """Accept `a, b,c` (what people write in an env file) as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# Selective greylisting's signals (services/policy/signals.py says what each means) and
# their default weights: a bot with no rDNS and a made-up HELO scores 3 and is greylisted;
# a provider with forward-confirmed rDNS and SPF pass scores -1 and is not.
GREYLIST_SIGNALS = ("no-rdns", "rdns-mismatch", "dynamic-rdns", "helo-ip", "helo-unresolved",
                    "dnsbl", "dnswl", "spf-pass", "known-sender", "passed-before")
DEFAULT_SIGNAL_WEIGHTS = ("no-rdns=2, rdns-mismatch=1, dynamic-rdns=2, helo-ip=1, "
                          "helo-unresolved=1, dnsbl=1, dnswl=1, spf-pass=-1, known-sender=-3, "
                          "passed-before=-1")


class Settings(BaseSettings):
    """The whole stack's settings. A service reads only the fields it needs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True,
        secrets_dir=SECRETS_DIR if os.path.isdir(SECRETS_DIR) else None)

    # --- shared by every service -------------------------------------------------------
    hostname: str = Field("mail.example.org", min_length=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:9100")
    drain_timeout: float = Field(30.0, ge=0)
    dns_servers: Annotated[list[HostPort], NoDecode] = []
    dns_timeout: float = Field(5.0, gt=0)
    # Seconds a peer of the policy service, the milter, a metrics listener or Postfix's
    # agent may take to send one request (a policy request, a milter packet) whole.
    request_timeout: float = Field(30.0, gt=0)
    mynetworks: Annotated[list[Network], NoDecode] = [
        parse_network("127.0.0.0/8"),
        parse_network("[::1]/128"),
    ]
    # Trust mail the Docker host itself sends through the published port: it arrives from
    # the address Docker gives the host on the edge network (see trusted_networks).
    trust_docker_host: bool = False
    # The compose networks' subnets (compose reads them from .env for the networks and
    # hands the same values to every SecuMail container). edge: Postfix's alone, where
    # port 25 is published.
    edge_subnet: Annotated[Network, NoDecode] = parse_network("172.29.124.0/24")
    mail_subnet: Annotated[Network, NoDecode] = parse_network("172.29.126.0/24")
    filter_subnet: Annotated[Network, NoDecode] = parse_network("172.29.125.0/24")
    # Message tracking (secumail/tracking.py): each service keeps its last events in memory
    # for the gateway to collect; off, nothing is recorded.
    tracking: bool = True
    tracking_buffer: int = Field(10_000, ge=100, le=1_000_000)
    # Who may read them (/events, which holds addresses): the gateway; loopback always.
    tracking_readers: CommaList = ["gateway"]

    # --- policy service (10023) --------------------------------------------------------
    policy_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:10023")
    policy_fail_open: bool = False
    policy_max_connections: int = Field(1000, ge=1)
    policy_idle_timeout: float = Field(300.0, gt=0)
    policy_max_line: int = Field(2048, ge=128)
    policy_max_attributes: int = Field(64, ge=8)
    policy_strict_attributes: bool = True

    greylist_enabled: bool = True
    greylist_store: str = "sqlite:///var/lib/secumail/greylist.sqlite"
    # Redis's password, when the store URL holds none: compose's Redis writes it here (on
    # Docker Swarm, a secret: /run/secrets/secumail_redis_password).
    redis_password_file: str = "/run/secumail/redis/password"
    greylist_delay: int = Field(300, ge=0)
    greylist_retry_window: int = Field(2 * 86400, gt=0)
    greylist_max_age: int = Field(35 * 86400, gt=0)
    greylist_auto_whitelist: int = Field(5, ge=0)
    greylist_whitelist_clients: CommaList = []
    greylist_whitelist_recipients: CommaList = []
    # selective: greylist only clients whose signals (services/policy/signals.py) add up to
    # the threshold; all: every unknown triplet, as postgrey.
    greylist_mode: Literal["selective", "all"] = "selective"
    greylist_threshold: float = 2.0
    greylist_signals: str = DEFAULT_SIGNAL_WEIGHTS
    greylist_dnswl_zones: CommaList = []  # zone*weight, weights negative
    greylist_known_senders: CommaList = []  # sender domains (and their subdomains)

    spf_enabled: bool = True
    spf_reject_fail: bool = True

    dnsbl_zones: CommaList = []
    dnsbl_threshold: float = Field(1.0, gt=0)

    # Outbound limits (secumail/outbound.py): what mynetworks hosts and authenticated users
    # may send, `scope:kind:count/period` entries; empty: no limits.
    outbound_limits: str = DEFAULT_OUTBOUND_LIMITS
    # A subject whose tries reach this many times a limit is held until released; 0: never.
    outbound_hold_factor: float = Field(10.0, ge=0)
    # Trust a policy request's sasl_username (an authenticated client): only when your
    # Postfix offers SMTP AUTH. SecuMail's does not, so a user name there was never checked.
    policy_trust_sasl: bool = False
    # Who is told when a sender is held (the gateway mails it once): empty, postmaster@.
    admin_address: str = ""

    # --- Postfix (25, and the 10027 re-injection smtpd) -------------------------------
    domains: CommaList = ["example.org"]
    mailboxes: CommaList = []  # user@domain or @domain (catch-all); postmaster@ always exists
    relayhost: str = ""
    delivery_transport: str = ""
    rbl_zones: CommaList = []
    policy_address: Annotated[HostPort, NoDecode] = parse_host_port("policy:10023")
    content_filter_address: Annotated[HostPort, NoDecode] = parse_host_port("clamav:10025")
    reinjection_port: int = Field(10027, ge=1, lt=65536)
    dkim_milter_address: str = "dkim:10028"
    xclient_hosts: Annotated[list[Network], NoDecode] = []
    tls_cert_file: str = "/etc/secumail/tls/cert.pem"
    tls_key_file: str = "/etc/secumail/tls/key.pem"
    smtpd_timeout: int = Field(60, ge=10, le=3600)
    # Postfix listens on IPv6 too (compose.ipv6.yaml sets it, with the network it needs).
    smtp_ipv6: bool = False
    # Mail leaving for other domains: each destination's MTA-STS policy (RFC 8461) is enforced
    # (services/postfix/mta_sts.py), and its DANE TLSA records (RFC 7672) when the resolver
    # validates DNSSEC; a certificate is checked against the CAs in outbound_tls_ca_file.
    outbound_mta_sts: bool = True
    outbound_dane: bool = True
    outbound_tls_ca_file: str = Field("/etc/ssl/certs/ca-certificates.crt", min_length=1)

    # --- content filters: ClamAV (10025 -> 10026) and SpamAssassin (10026 -> 10027) -------
    # before-queue: port 25's smtpd proxies each message through the filters while the
    # client waits (a refusal is the client's 5xx; one queue pass). after-queue: the
    # tutorial's content_filter (queued, then filtered; refusals kept, not bounced).
    filter_mode: Literal["before-queue", "after-queue"] = "before-queue"
    message_size_limit: int = Field(10240000, ge=1024)
    relay_timeout: float = Field(120.0, gt=0)  # an SMTP next hop's reply to one command
    scanner_timeout: float = Field(120.0, gt=0)  # clamd's or spamd's answer on one message
    filter_idle_timeout: float = Field(300.0, gt=0)
    filter_max_connections: int = Field(200, ge=1)
    quarantine_dir: str = "/var/lib/secumail/quarantine"
    quarantine_max_bytes: int = Field(2 * 1024**3, ge=1024 * 1024)
    quarantine_max_messages: int = Field(20000, ge=1)
    quarantine_max_age_days: float = Field(30.0, gt=0)
    # Users' daily digest of their own quarantined mail (gateway/digest.py): sent at this
    # UTC hour to each recipient in SECUMAIL_DOMAINS, each message with links to release or
    # delete it, valid this many days, opened at SECUMAIL_QUARANTINE_DIGEST_URL.
    quarantine_digest: bool = False
    quarantine_digest_hour: int = Field(7, ge=0, le=23)
    quarantine_digest_url: str = ""
    quarantine_digest_link_days: int = Field(7, ge=1, le=30)
    quarantine_digest_from: str = ""  # empty: postmaster@ the first of SECUMAIL_DOMAINS

    clamav_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:10025")
    clamav_next_hop: Annotated[HostPort, NoDecode] = parse_host_port("spamd:10026")
    # Who may hand the filter mail (IPs, networks, host names; 127.0.0.1 always may).
    clamav_allowed_clients: CommaList = ["postfix", "gateway"]
    clamd_address: str = "/run/clamav/clamd.sock"
    clamd_stream_max_length: int = Field(25 * 1024 * 1024, ge=1024)
    virus_action: Literal["reject", "drop", "quarantine", "pass"] = "reject"
    clamav_fail_open: bool = False
    # Dangerous attachments (services/clamav/attachments.py): reject, quarantine, strip
    # (deliver without them, a text part saying why), pass (deliver, marked), off.
    attachment_action: Literal["reject", "quarantine", "strip", "pass", "off"] = "reject"
    attachment_block: CommaList = []  # extensions refused on top of the default list
    attachment_allow: CommaList = []  # extensions or rule names let through
    attachment_max_depth: int = Field(3, ge=1, le=20)  # archives inside archives
    attachment_max_expanded: int = Field(100 * 1024 * 1024, ge=1024)  # bytes read in all
    attachment_max_parts: int = Field(1000, ge=10)  # MIME parts; archive members
    attachment_max_member: int = Field(16 * 1024 * 1024, ge=64 * 1024)  # held at once
    attachment_max_seconds: float = Field(10.0, gt=0, le=600)  # CPU seconds a message

    spamd_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:10026")
    spamd_next_hop: Annotated[HostPort, NoDecode] = parse_host_port("postfix:10027")
    spamd_allowed_clients: CommaList = ["clamav", "gateway"]
    # SpamAssassin's spamd (compose service `spamassassin`), which the spamd filter asks.
    spamassassin_address: str = "/run/spamd/spamd.sock"
    spam_tag_score: float = 5.0
    spam_reject_score: float = 10.0
    spam_quarantine_score: float = 8.0
    spam_action: Literal["reject", "quarantine"] = "reject"
    spam_report_symbols: bool = True
    spamd_fail_open: bool = False
    spam_max_size: int = Field(512_000, ge=0)
    # Users' reports (services/spamd/reports.py): local parts, at each of our domains.
    spam_report_address: str = Field("", pattern=r"^[A-Za-z0-9._+-]{0,64}$")
    ham_report_address: str = Field("", pattern=r"^[A-Za-z0-9._+-]{0,64}$")
    report_max_per_hour: int = Field(50, ge=1)

    # --- DKIM milter (10028) ------------------------------------------------------------
    dkim_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:10028")
    dkim_keys_dir: str = "/var/lib/secumail/dkim"
    dkim_fail_open: bool = False
    dkim_max_connections: int = Field(1000, ge=1)
    dkim_idle_timeout: float = Field(600.0, gt=0)
    # Seconds the milter may take to decide on one message (its DNS lookups: keys, SPF,
    # DMARC, ARC); past them it answers as SECUMAIL_DKIM_FAIL_OPEN says.
    dkim_answer_timeout: float = Field(30.0, gt=0)
    # Key rotation (secumail/dkim_rotation.py): a successor every this many days (0: off),
    # looked for this often; a retired key's record stays published this many days.
    dkim_rotate_days: float = Field(0.0, ge=0)
    dkim_rotate_check: float = Field(600.0, gt=0)
    dkim_retired_days: float = Field(7.0, ge=0)
    authserv_id: str = ""  # empty: the hostname
    dmarc_reject: bool = False
    # DMARC aggregate reports (secumail/dmarc_reports.py): each check counted by the milter
    # in this store; once a day the gateway sends each domain that asks (rua) its report.
    dmarc_reports: bool = False
    dmarc_report_db: str = "/var/lib/secumail/dmarc/reports.sqlite"
    dmarc_report_flush: float = Field(60.0, gt=0, le=3600)  # seconds between two writes
    dmarc_report_from: str = ""  # empty: dmarc-reports@ the first of SECUMAIL_DOMAINS
    # TLS reports (RFC 8460, secumail/tlsrpt.py): each session Postfix has with another
    # domain's MX is counted (from its log, through tracking); once a day the gateway sends
    # each domain that publishes a _smtp._tls record its report.
    tlsrpt: bool = False
    tlsrpt_from: str = ""  # empty: tls-reports@ the first of SECUMAIL_DOMAINS
    # The local part of the address, at each of SECUMAIL_DOMAINS, where other receivers send
    # their DMARC and TLS-RPT reports about our domains (rua=mailto:...); empty: none.
    dmarc_rua_address: str = Field("", pattern=r"^[A-Za-z0-9._+-]{0,64}$")
    # Mail from outside (not mynetworks, not authenticated) whose header From is one of our
    # domains: refused unless signed with our key (services/dkim/own_domain.py).
    own_domain_from_outside: Literal["reject", "accept"] = "reject"
    own_domain_allowed_senders: CommaList = []  # addresses, or domains: may all the same
    own_domain_allowed_networks: Annotated[list[Network], NoDecode] = []  # the same
    # ARC (services/dkim/arc.py): sealers (domains, and their subdomains) trusted to say a
    # message passed DMARC before they forwarded it: a DMARC fail with their passing chain is
    # delivered (RFC 8617 7.2.1), never refused under SECUMAIL_DMARC_REJECT.
    arc_trusted_sealers: CommaList = []
    # Our domains that forward mail elsewhere (aliases to other providers): mail from outside
    # to a recipient there is ARC-sealed with that domain's DKIM key (RSA), so that the next
    # receiver can trust what we found although forwarding broke SPF.
    arc_seal_domains: CommaList = []

    # --- gateway (8080): health, metrics, chain probe, admin API ---------------------------
    gateway_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:8080")
    # Host names the gateway answers to (with SECUMAIL_HOSTNAME and any IP address).
    gateway_hosts: CommaList = ["localhost", "gateway"]
    # Secrets: SecretStr keeps them out of repr(), logs and error messages.
    admin_token: SecretStr = SecretStr("")  # empty: no admin API
    metrics_token: SecretStr = SecretStr("")  # empty: health and metrics open
    # Wrong tokens (API or console) a client may present in the window before it gets 429.
    gateway_wrong_tokens: int = Field(10, ge=1)
    gateway_wrong_token_window: float = Field(300.0, gt=0)
    postfix_address: Annotated[HostPort, NoDecode] = parse_host_port("postfix:25")
    gateway_timeout: float = Field(5.0, gt=0)
    gateway_request_timeout: float = Field(10.0, gt=0)
    gateway_max_connections: int = Field(1000, ge=1)
    probe_mailbox: str = ""  # empty: postmaster@ the first of SECUMAIL_DOMAINS
    probe_helo: str = "probe.secumail.invalid"
    probe_sender: str = ""  # empty: the null sender <>
    probe_interval: float = Field(300.0, ge=0)
    probe_timeout: float = Field(120.0, gt=0)
    # Where the gateway keeps the events it collects, how long, and how often it asks.
    tracking_db: str = "/var/lib/secumail/tracking/tracking.db"
    tracking_retention_days: float = Field(7.0, gt=0)
    tracking_max_events: int = Field(2_000_000, ge=1000)
    tracking_interval: float = Field(2.0, gt=0)
    tracking_search_seconds: float = Field(1.5, gt=0, le=60)
    tracking_search_events: int = Field(20_000, ge=1000)
    # Our own MTA-STS policy (secumail/mta_sts.py), served at /.well-known/mta-sts.txt:
    # enforce, testing or none; empty: not served. mx: the names senders may deliver to
    # (empty: SECUMAIL_HOSTNAME); max_age in seconds.
    mta_sts_mode: Literal["", "enforce", "testing", "none"] = ""
    mta_sts_mx: CommaList = []
    mta_sts_max_age: int = Field(604800, ge=86400, le=31_557_600)
    # The operator's console (/console): its sign-in cookie is Secure (sent over HTTPS only,
    # and over plain HTTP to localhost, which browsers count as secure).
    console_secure_cookie: bool = True

    @field_validator(
        "greylist_whitelist_clients", "greylist_whitelist_recipients", "dnsbl_zones",
        "greylist_dnswl_zones", "greylist_known_senders", "attachment_block", "attachment_allow",
        "domains", "rbl_zones", "mailboxes", "clamav_allowed_clients", "spamd_allowed_clients",
        "tracking_readers", "own_domain_allowed_senders", "arc_trusted_sealers", "mta_sts_mx",
        "gateway_hosts", "arc_seal_domains", mode="before",
    )
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator(
        "metrics_listen", "policy_listen", "dkim_listen", "clamav_listen", "clamav_next_hop",
        "spamd_listen", "spamd_next_hop", "policy_address", "content_filter_address",
        "gateway_listen", "postfix_address", mode="before",
    )
    @classmethod
    def _host_port(cls, value: object) -> object:
        return parse_host_port(value) if isinstance(value, str) else value

    @field_validator("dns_servers", mode="before")
    @classmethod
    def _host_ports(cls, value: object) -> object:
        items = _split_commas(value)
        if isinstance(items, list):
            return [parse_host_port(i, default_port=53) if isinstance(i, str) else i for i in items]
        return items

    @field_validator("filter_subnet", "mail_subnet", "edge_subnet", mode="before")
    @classmethod
    def _network(cls, value: object) -> object:
        return parse_network(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _subnets_apart(self) -> Settings:
        subnets = self.subnets
        for i, (name, subnet) in enumerate(subnets.items()):
            for other, other_subnet in list(subnets.items())[i + 1:]:
                if subnet.overlaps(other_subnet):
                    raise ValueError(f"{name}={subnet} and {other}={other_subnet} overlap")
        return self

    @model_validator(mode="after")
    def _spam_scores_in_order(self) -> Settings:
        if self.spam_quarantine_score < self.spam_tag_score:
            raise ValueError(f"SECUMAIL_SPAM_QUARANTINE_SCORE={self.spam_quarantine_score} is "
                             f"below SECUMAIL_SPAM_TAG_SCORE={self.spam_tag_score}: mail "
                             "would be quarantined without being spam")
        return self

    @field_validator("mynetworks", "xclient_hosts", "own_domain_allowed_networks",
                     mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        items = _split_commas(value)
        if isinstance(items, list):
            return [parse_network(i) if isinstance(i, str) else i for i in items]
        return items

    @field_validator("dnsbl_zones")
    @classmethod
    def _dnsbl_zones(cls, zones: list[str]) -> list[str]:
        for zone in zones:
            parse_weighted_zone(zone)  # raises ValueError with the offending entry
        return zones

    @field_validator("greylist_dnswl_zones")
    @classmethod
    def _dnswl_zones(cls, zones: list[str]) -> list[str]:
        for zone in zones:
            parse_weighted_zone(zone, whitelist=True)
        return zones

    @field_validator("greylist_signals")
    @classmethod
    def _signals(cls, text: str) -> str:
        parse_signal_weights(text)
        return text

    @field_validator("mta_sts_mx")
    @classmethod
    def _mx_names(cls, items: list[str]) -> list[str]:
        names = [item.lower().rstrip(".") for item in items]
        for name in names:
            if not _DOMAIN.match(name.removeprefix("*.")):
                raise ValueError(f"not a host name or *.domain: {name!r}")
        return names

    @field_validator("arc_trusted_sealers", "arc_seal_domains")
    @classmethod
    def _sealers(cls, items: list[str]) -> list[str]:
        domains = [item.lower().strip(".") for item in items]
        for domain in domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"not a domain name: {domain!r}")
        return domains

    @field_validator("attachment_block", "attachment_allow")
    @classmethod
    def _extensions(cls, items: list[str]) -> list[str]:
        for item in items:
            if not re.fullmatch(r"\.?[a-z0-9][a-z0-9_-]*", item, re.I):
                raise ValueError(f"not a file extension or rule name: {item!r}")
        return [item.lower().lstrip(".") for item in items]

    @field_validator("clamav_allowed_clients", "spamd_allowed_clients", "tracking_readers")
    @classmethod
    def _allowed_clients(cls, entries: list[str]) -> list[str]:
        split_entries(entries)  # raises ValueError naming the entry
        return entries

    @field_validator("domains", "greylist_known_senders")
    @classmethod
    def _domains(cls, domains: list[str], info: ValidationInfo) -> list[str]:
        kind = "mail" if info.field_name == "domains" else "sender"
        for domain in domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"bad {kind} domain {domain!r}")
        return [d.lower() for d in domains]

    @field_validator("mailboxes")
    @classmethod
    def _mailboxes(cls, mailboxes: list[str]) -> list[str]:
        for address in mailboxes:
            local, _, domain = address.lower().rpartition("@")
            if not _LOCAL_PART.match(local) or not _DOMAIN.match(domain):
                raise ValueError(f"bad mailbox {address!r} (user@domain or @domain)")
        return [m.lower() for m in mailboxes]

    @field_validator("clamd_address", "spamassassin_address")
    @classmethod
    def _backend_address(cls, address: str) -> str:
        if not address.startswith("/"):
            parse_host_port(address)  # raises ValueError naming the address
        return address

    @field_validator("greylist_store")
    @classmethod
    def _store_url(cls, url: str) -> str:
        if not (url.startswith("sqlite://") or url.startswith(("redis://", "rediss://"))):
            raise ValueError("must start with sqlite:/// or redis://")
        return url

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _token(cls, token: SecretStr) -> SecretStr:
        value = token.get_secret_value()
        if value and (len(value) < 16 or not value.isprintable() or " " in value):
            # The message must not echo the token (describe_errors prints the input).
            raise ValueError("must be empty or 16 printable characters at least, no spaces")
        return token

    @field_validator("quarantine_digest_url")
    @classmethod
    def _digest_url(cls, url: str) -> str:
        if url and not re.match(r"^https?://[a-z0-9.-]+(:\d{1,5})?(/[^\s?#]*)?$", url, re.I):
            raise ValueError("must be the gateway's address as users reach it, "
                             "https://host[:port][/path]")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _digest_needs_url(self) -> Settings:
        if self.quarantine_digest and not self.quarantine_digest_url:
            raise ValueError("SECUMAIL_QUARANTINE_DIGEST=true needs SECUMAIL_QUARANTINE_DIGEST_URL"
                             ", where users' links open the gateway")
        return self

    @model_validator(mode="after")
    def _tlsrpt_needs_tracking(self) -> Settings:
        if self.tlsrpt and not self.tracking:
            raise ValueError("SECUMAIL_TLSRPT=true needs SECUMAIL_TRACKING=true: TLS reports "
                             "count the sessions Postfix's tracking events tell")
        return self

    @field_validator("probe_mailbox", "probe_sender", "admin_address",
                     "quarantine_digest_from", "dmarc_report_from", "tlsrpt_from")
    @classmethod
    def _probe_mailbox(cls, address: str) -> str:
        local, at, domain = address.lower().rpartition("@")
        if address and (not at or not local or not _LOCAL_PART.match(local)
                        or not _DOMAIN.match(domain)):
            raise ValueError(f"bad address {address!r} (user@domain)")
        return address.lower()

    @field_validator("outbound_limits")
    @classmethod
    def _outbound_limits(cls, text: str) -> str:
        parse_limits(text)
        return text

    @field_validator("probe_helo")
    @classmethod
    def _probe_helo(cls, name: str) -> str:
        if not _DOMAIN.match(name):
            raise ValueError(f"not a fully-qualified host name: {name!r}")
        return name.lower()

    @property
    def subnets(self) -> dict[str, Network]:
        """The compose networks' subnets, by the variable that sets each."""
        return {"SECUMAIL_EDGE_SUBNET": self.edge_subnet,
                "SECUMAIL_MAIL_SUBNET": self.mail_subnet,
                "SECUMAIL_FILTER_SUBNET": self.filter_subnet}

    @property
    def docker_host_addresses(self) -> list[Network]:
        """The Docker host as Postfix sees it: the edge network's gateway, which Docker makes
        the subnet's first address. Port 25 is published on the edge network (compose gives
        it the highest priority), so mail the host sends to it comes from there."""
        return [parse_network(str(next(self.edge_subnet.hosts())))]

    @property
    def trusted_networks(self) -> list[Network]:
        """mynetworks, plus the Docker host when SECUMAIL_TRUST_DOCKER_HOST says so."""
        host = self.docker_host_addresses if self.trust_docker_host else []
        return [*self.mynetworks, *host]

    @property
    def quarantine_limits(self) -> QuarantineLimits:
        return QuarantineLimits(self.quarantine_max_bytes, self.quarantine_max_messages,
                                self.quarantine_max_age_days * 86400)

    def in_mynetworks(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.trusted_networks)

    @property
    def weighted_dnsbl_zones(self) -> list[tuple[str, float]]:
        return [parse_weighted_zone(z) for z in self.dnsbl_zones]

    @property
    def weighted_dnswl_zones(self) -> list[tuple[str, float]]:
        return [parse_weighted_zone(z, whitelist=True) for z in self.greylist_dnswl_zones]

    @property
    def signal_weights(self) -> dict[str, float]:
        return parse_signal_weights(self.greylist_signals)

    @property
    def outbound(self) -> list[Limit]:
        return parse_limits(self.outbound_limits)

    @property
    def mta_sts_hosts(self) -> list[str]:
        """The MX names the policy lists (`*.example.org` allowed, RFC 8461 4.1)."""
        return self.mta_sts_mx or [self.hostname]

    @property
    def received_reports_spool(self) -> Path:
        """Where the spamd filter keeps report mails for the gateway (the dmarc volume)."""
        return Path(self.dmarc_report_db).parent / "received"

    @property
    def dmarc_rua_addresses(self) -> frozenset[str]:
        local = self.dmarc_rua_address.lower()
        return frozenset(f"{local}@{d}" for d in self.domains) if local else frozenset()

    @property
    def dmarc_report_sender(self) -> str:
        return self.dmarc_report_from or f"dmarc-reports@{self.domains[0]}"

    @property
    def tlsrpt_sender(self) -> str:
        return self.tlsrpt_from or f"tls-reports@{self.domains[0]}"

    @property
    def digest_sender(self) -> str:
        return self.quarantine_digest_from or f"postmaster@{self.domains[0]}"

    @property
    def admin_mailbox(self) -> str:
        """Who is told of held senders: SECUMAIL_ADMIN_ADDRESS, or postmaster@."""
        return self.admin_address or f"postmaster@{self.domains[0]}"

    @property
    def probe_address(self) -> str:
        """Where the gateway's canary goes: the probe mailbox, or postmaster@ by default."""
        return self.probe_mailbox or f"postmaster@{self.domains[0]}"


def parse_weighted_zone(entry: str, whitelist: bool = False) -> tuple[str, float]:
    """`zen.spamhaus.org*2` -> ("zen.spamhaus.org", 2.0); no weight means 1. A whitelist
    zone's weight is negative (it speaks for the client): `list.dnswl.org*-2`, -1 without."""
    kind = "DNSWL" if whitelist else "DNSBL"
    zone, _, weight = entry.partition("*")
    zone = zone.strip().rstrip(".").lower()
    if not zone or " " in zone or "." not in zone:
        raise ValueError(f"bad {kind} zone {entry!r}")
    try:
        value = float(weight) if weight else (-1.0 if whitelist else 1.0)
    except ValueError:
        raise ValueError(f"bad weight in {kind} zone {entry!r}") from None
    if (value >= 0) if whitelist else (value <= 0):
        sign = "negative" if whitelist else "positive"
        raise ValueError(f"weight must be {sign} in {kind} zone {entry!r}")
    return zone, value


def parse_signal_weights(text: str) -> dict[str, float]:
    """`no-rdns=2, spf-pass=-1` -> weights; a signal left out weighs nothing (is off).
    dnsbl and dnswl scale the listing zones' own weights."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, equals, value = item.partition("=")
        name = name.strip().lower()
        if name not in GREYLIST_SIGNALS or not equals:
            raise ValueError(f"not a signal=weight: {item!r} (signals: "
                             f"{', '.join(GREYLIST_SIGNALS)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"bad weight in {item!r}") from None
    return weights


# Secrets only the gateway (and Prometheus, the metrics token) uses; compose gives them to
# those containers only, from .env.
GATEWAY_SECRETS = ("SECUMAIL_ADMIN_TOKEN", "SECUMAIL_METRICS_TOKEN")


def misplaced_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """The gateway's secrets found in another service's environment (set in secumail.env,
    which every container reads, instead of .env)."""
    environ = dict(os.environ) if environ is None else environ
    return [name for name in GATEWAY_SECRETS if environ.get(name)]


def describe_errors(error: ValidationError) -> list[str]:
    """One line per invalid setting, naming the variable as the user spelled it."""
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check across settings: its message names them (and the
            lines.append(item["msg"].removeprefix("Value error, "))  # input holds tokens)
            continue
        field = str(item["loc"][0])
        variable = ENV_PREFIX + field.upper()
        secret = field in Settings.model_fields and Settings.model_fields[field].annotation \
            is SecretStr
        got = "a hidden value" if secret else repr(item.get("input"))  # never print a token
        lines.append(f"{variable}: {item['msg']} (got {got})")
    return lines


def load_settings() -> Settings:
    """Read the environment once; exit with status 2 and a clear message on a bad value."""
    for note in carry_renamed(os.environ):
        print(f"secumail: renamed setting: {note}", file=sys.stderr)
    try:
        return Settings()
    except ValidationError as error:
        for line in describe_errors(error):
            print(f"secumail: invalid setting {line}", file=sys.stderr)
        raise SystemExit(2) from None
