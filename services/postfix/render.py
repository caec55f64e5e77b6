"""Postfix's main.cf and master.cf, rendered from the SECUMAIL_* settings.

One renderer, no sed: the container writes these files at every start, so the settings
are the only place an admin changes anything. The restrictions are the tutorial's, with
today's names of the HELO restrictions and Postfix's later hardening options.
"""

from __future__ import annotations

from secumail.netaddr import postfix_network
from secumail.settings import Settings
from services.postfix import outbound_tls

MAILBOX_BASE = "/var/mail/vhosts"
VMAIL_ID = 5000  # owner of the mailboxes (the image's vmail user)
MAILBOX_MAP = "/etc/postfix/virtual_mailboxes"
OWN_DOMAINS_MAP = "/etc/postfix/own_domains"
OUTBOUND_CLIENTS_MAP = "/etc/postfix/outbound_clients"
# The restriction class that asks the policy service to count a trusted client's mail.
OUTBOUND_CLASS = "secumail_outbound"

# Debian's master.cf services, chroot off (a container is its own jail, and Postfix then
# reads the container's resolv.conf, where compose's DNS answers for the service names).
STANDARD_SERVICES = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("local", "unix", "-", "n", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def _restrictions(*items: str) -> str:
    return ", ".join(item for item in items if item)


def main_cf(settings: Settings) -> dict[str, str]:
    """main.cf as ordered name -> value pairs (tests read them back one by one)."""
    policy = f"check_policy_service inet:{settings.policy_address}"
    rbl = [f"reject_rbl_client {zone}" for zone in settings.rbl_zones]
    domains = ", ".join(settings.domains)
    config = {
        "compatibility_level": "3.6",
        "myhostname": settings.hostname,
        "mydomain": settings.domains[0],
        "myorigin": "$mydomain",
        "mydestination": "localhost",
        "mynetworks": " ".join(postfix_network(n) for n in settings.trusted_networks),
        "inet_interfaces": "all",
        "inet_protocols": "all" if settings.smtp_ipv6 else "ipv4",
        "maillog_file": "/dev/stdout",
        "smtpd_banner": "$myhostname ESMTP",
        "biff": "no",
        "append_dot_mydomain": "no",
        "alias_maps": "",
        "alias_database": "",
        "recipient_delimiter": "+",
        "message_size_limit": str(settings.message_size_limit),
        "relayhost": settings.relayhost,
        # The tutorial's basic restrictions.
        "smtpd_delay_reject": "yes",
        "smtpd_helo_required": "yes",
        "strict_rfc821_envelopes": "yes",
        # Later hardening: SMTP smuggling, pipelining abuse, address guessing, source routes.
        "smtpd_forbid_bare_newline": "yes",
        "smtpd_forbid_bare_newline_exclusions": "$mynetworks",
        "smtpd_forbid_unauth_pipelining": "yes",
        # A deadline per line, not per read: endless or trickled lines are dropped.
        "smtpd_timeout": f"{settings.smtpd_timeout}s",
        "smtpd_per_record_deadline": "yes",
        "disable_vrfy_command": "yes",
        "allow_percent_hack": "no",
        # A sender domain that does not exist (NXDOMAIN) is refused for good; DNS trouble
        # still gets a 450 from Postfix.
        "unknown_address_reject_code": "550",
        "swap_bangpath": "no",
        "smtpd_client_restrictions": _restrictions(
            "permit_mynetworks", "permit_sasl_authenticated", *rbl, "permit"
        ),
        "smtpd_helo_restrictions": _restrictions(
            "permit_mynetworks", "reject_non_fqdn_helo_hostname",
            "reject_invalid_helo_hostname", "permit",
        ),
        "smtpd_sender_restrictions": _restrictions(
            "permit_mynetworks", "permit_sasl_authenticated", "reject_non_fqdn_sender",
            "reject_unknown_sender_domain", f"check_sender_access texthash:{OWN_DOMAINS_MAP}",
            "permit",
        ),
        # Our own hosts' mail is counted (outbound limits) before permit_mynetworks lets it
        # through: the policy service asked at RCPT for them alone (outbound_clients_map).
        "smtpd_relay_restrictions": _restrictions(
            f"check_client_access cidr:{OUTBOUND_CLIENTS_MAP}" if settings.outbound else "",
            "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination"
        ),
        "smtpd_recipient_restrictions": _restrictions(
            "permit_mynetworks", "reject_non_fqdn_recipient", "reject_unknown_recipient_domain",
            "reject_unauth_destination", policy, "permit",
        ),
        # Asked again at DATA so that the policy service can add Received-SPF.
        "smtpd_data_restrictions": policy,
        "smtpd_authorized_xclient_hosts": " ".join(
            postfix_network(n) for n in settings.xclient_hosts
        ),
        # STARTTLS offered, never required (a public MX cannot require it).
        "smtpd_tls_cert_file": settings.tls_cert_file,
        "smtpd_tls_key_file": settings.tls_key_file,
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "1",
        # Mail to other domains: TLS when offered; required, with a verified certificate,
        # where the destination's MTA-STS policy or DNSSEC-signed TLSA records demand it (a
        # failure defers the mail, it never goes out in clear).
        "smtp_tls_security_level": "dane" if settings.outbound_dane else "may",
        "smtp_dns_support_level": "dnssec" if settings.outbound_dane else "",
        "smtp_tls_policy_maps": outbound_tls.policy_map(settings),
        "smtp_tls_CAfile": settings.outbound_tls_ca_file,
        "smtp_tls_loglevel": "1",
        # Delivery to the mail domains: Maildirs in the mail volume, or the transport given.
        "virtual_mailbox_domains": domains,
        "virtual_mailbox_base": MAILBOX_BASE,
        "virtual_mailbox_maps": f"texthash:{MAILBOX_MAP}",
        "virtual_uid_maps": f"static:{VMAIL_ID}",
        "virtual_gid_maps": f"static:{VMAIL_ID}",
    }
    if settings.outbound:
        config["smtpd_restriction_classes"] = OUTBOUND_CLASS
        config[OUTBOUND_CLASS] = policy
    if settings.filter_mode == "after-queue":
        # The tutorial's chain: queued first, then handed to the "scan" transport; address
        # mappings wait for the second pass (mail back from the filters on 10027).
        config["content_filter"] = (f"scan:[{settings.content_filter_address.host}]:"
                                    f"{settings.content_filter_address.port}")
        config["receive_override_options"] = "no_address_mappings"
    if settings.delivery_transport:
        config["virtual_transport"] = settings.delivery_transport
    if settings.dkim_milter_address:
        config.update({
            "smtpd_milters": f"inet:{settings.dkim_milter_address}",
            "non_smtpd_milters": "$smtpd_milters",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
        })
    return config


def mailbox_map(settings: Settings) -> str:
    """Each mailbox and its Maildir under the mail volume: `user@domain domain/user/`.

    A table, not a pattern: Postfix rightly refuses computed mailbox paths. Local parts are
    validated by the settings, so no path can climb out of the mail volume.
    """
    addresses = [f"postmaster@{d}" for d in settings.domains]
    # The report addresses exist (the spamd filter takes their mail, learns it or keeps it
    # for the gateway, delivers nothing: their Maildirs stay empty).
    addresses += [f"{local}@{d}" for local in (settings.spam_report_address,
                                               settings.ham_report_address,
                                               settings.dmarc_rua_address)
                  if local for d in settings.domains]
    addresses += [m for m in settings.mailboxes if m not in addresses]
    lines = []
    for address in addresses:
        local, _, domain = address.rpartition("@")
        lines.append(f"{address} {domain}/{local or '@catchall'}/")
    return "\n".join(lines) + "\n"


def standard_services() -> str:
    """The master.cf lines every Postfix instance needs (also used by the tests' Postfix)."""
    return "".join("{:<10} {:<10} {:<3} {:<3} {:<3} {:<5} {:<3} {}\n".format(*s)
                   for s in STANDARD_SERVICES)


def own_domains_map(settings: Settings) -> str:
    """Our own domains as senders are for our own users: from anywhere else, a forgery."""
    text = "REJECT 5.7.1 Sender address forged: this domain's mail comes from its own servers"
    return "".join(f"{domain} {text}\n" for domain in settings.domains)


def outbound_clients_map(settings: Settings) -> str:
    """The trusted networks, each sent to the outbound restriction class: their mail is
    counted by the policy service, outside clients' mail never is."""
    return "".join(f"{network} {OUTBOUND_CLASS}\n" for network in settings.trusted_networks)


def scan_transport(max_processes: int = 16) -> list[str]:
    """The first content filter, with the client's attributes passed along (XFORWARD). One
    session per message: a cached session would pin a burst to one replica of a scaled
    filter, while a new one goes to a random address of the name (all the replicas)."""
    return [
        f"scan       unix       -   -   n   -     {max_processes:<3} smtp",
        "  -o smtp_send_xforward_command=yes",
        "  -o disable_mime_output_conversion=yes",
        "  -o smtp_connection_cache_on_demand=no",
        # A hop inside the stack: no TLS, no MTA-STS or DANE lookups for it.
        "  -o smtp_tls_security_level=none",
        "  -o smtp_tls_policy_maps=",
        "  -o smtp_dns_support_level=",
    ]


def smtp_options(settings: Settings) -> list[str]:
    """Port 25's smtpd. Before-queue: each message goes through the filters while the client
    waits (SMTPD_PROXY_README): a refusal is the client's own 5xx, nothing bounces, and the
    message is queued once, by the 10027 smtpd. speed_adjust receives the whole message
    before opening the filter connection, so a slow client holds no filter; the timeout lets
    the filters answer (their own deadline is SECUMAIL_RELAY_TIMEOUT) before Postfix gives
    up. No filter answers: the client gets a 4xx and retries, nothing is accepted unscanned.
    Postfix shows a proxying smtpd's milters nothing: the DKIM milter moves to 10027."""
    if settings.filter_mode != "before-queue":
        return []
    address = settings.content_filter_address
    return [
        f"smtpd_proxy_filter=inet:{address.host}:{address.port}",
        "smtpd_proxy_options=speed_adjust",
        f"smtpd_proxy_timeout={int(settings.relay_timeout) + 60}s",
        "smtpd_milters=",
    ]


def reinjection_options(settings: Settings) -> list[str]:
    """The tutorial's 10027: mail back from the filters, no restrictions, no filter, open
    only to the filters' network. After-queue, the milter ran on port 25 already; before-
    queue it runs here, and address mappings happen here (the one pass through cleanup)."""
    subnet = postfix_network(settings.filter_subnet)
    # Docker's gateway (the subnet's first address) is the host, not a filter: keep it out.
    gateway = next(settings.filter_subnet.hosts())
    trusted = f"!{gateway},{subnet}"
    overrides = ["no_unknown_recipient_checks", "no_header_body_checks"]
    if settings.filter_mode == "after-queue":
        overrides.append("no_milters")
    return [
        "content_filter=",
        f"receive_override_options={','.join(overrides)}",
        "smtpd_helo_restrictions=",
        "smtpd_client_restrictions=permit_mynetworks,reject",
        "smtpd_sender_restrictions=",
        "smtpd_relay_restrictions=permit_mynetworks,reject",
        "smtpd_recipient_restrictions=permit_mynetworks,reject",
        "smtpd_data_restrictions=",
        f"mynetworks={trusted}",
        f"smtpd_authorized_xforward_hosts={trusted}",
        "smtpd_forbid_bare_newline=no",
    ]


def master_cf(settings: Settings) -> str:
    lines = ["smtp       inet       n   -   n   -     -   smtpd"]
    lines += [f"  -o {option}" for option in smtp_options(settings)]
    lines.append(standard_services().rstrip("\n"))
    if settings.filter_mode == "after-queue":
        lines += scan_transport()
    # As many processes as the filters may hold sessions open (they keep them for reuse).
    lines.append(f"{settings.reinjection_port:<10} inet       n   -   n   -     100 smtpd")
    lines += [f"  -o {option}" for option in reinjection_options(settings)]
    return "\n".join(lines) + "\n"


def render(settings: Settings) -> dict[str, str]:
    """File name (under /etc/postfix) -> content."""
    main = "".join(f"{name} = {value}\n" for name, value in main_cf(settings).items())
    header = "# Written by secumail-postfix from the SECUMAIL_* settings at start. Do not edit.\n"
    return {
        "main.cf": header + main,
        "master.cf": header + master_cf(settings),
        MAILBOX_MAP.rsplit("/", 1)[1]: mailbox_map(settings),
        OWN_DOMAINS_MAP.rsplit("/", 1)[1]: own_domains_map(settings),
        OUTBOUND_CLIENTS_MAP.rsplit("/", 1)[1]: outbound_clients_map(settings),
    }
