"""Postfix's configuration as rendered from the settings: the tutorial's restrictions, the
chain of filters, the re-injection port, never an open relay."""

from __future__ import annotations

import itertools

from secumail.settings import Settings
from services.postfix.render import mailbox_map, main_cf, master_cf, render


def settings(**overrides: str) -> Settings:
    return Settings(domains="secumail.test,example.net", hostname="mx.secumail.test", **overrides)


def test_the_tutorials_restrictions_in_order() -> None:
    config = main_cf(settings())
    assert config["smtpd_delay_reject"] == "yes"
    assert config["smtpd_helo_required"] == "yes"
    assert config["strict_rfc821_envelopes"] == "yes"
    assert config["smtpd_helo_restrictions"] == (
        "permit_mynetworks, reject_non_fqdn_helo_hostname, reject_invalid_helo_hostname, permit"
    )
    assert config["smtpd_sender_restrictions"] == (
        "permit_mynetworks, permit_sasl_authenticated, reject_non_fqdn_sender, "
        "reject_unknown_sender_domain, check_sender_access texthash:/etc/postfix/own_domains, "
        "permit"
    )
    assert config["smtpd_recipient_restrictions"] == (
        "permit_mynetworks, reject_non_fqdn_recipient, reject_unknown_recipient_domain, "
        "reject_unauth_destination, check_policy_service inet:policy:10023, permit"
    )
    assert config["smtpd_data_restrictions"] == "check_policy_service inet:policy:10023"


def test_never_an_open_relay() -> None:
    config = main_cf(settings())
    assert config["smtpd_relay_restrictions"].endswith("reject_unauth_destination")
    assert config["mynetworks"] == "127.0.0.0/8 [::1]/128"
    assert config["allow_percent_hack"] == "no" and config["swap_bangpath"] == "no"
    assert config["smtpd_authorized_xclient_hosts"] == ""
    # The Docker host's own mail, when the admin trusts it: its one address, no subnet.
    trusting = main_cf(settings(trust_docker_host="true"))
    assert trusting["mynetworks"] == "127.0.0.0/8 [::1]/128 172.29.124.1/32"
    assert config["inet_protocols"] == "ipv4"
    assert main_cf(settings(smtp_ipv6="true"))["inet_protocols"] == "all"


def test_rbl_zones_go_before_the_final_permit() -> None:
    config = main_cf(settings(rbl_zones="zen.example, bl.example"))
    assert config["smtpd_client_restrictions"] == (
        "permit_mynetworks, permit_sasl_authenticated, reject_rbl_client zen.example, "
        "reject_rbl_client bl.example, permit"
    )


def test_after_queue_the_tutorials_content_filter() -> None:
    after = settings(content_filter_address="clamav:10025", filter_mode="after-queue")
    config = main_cf(after)
    assert config["content_filter"] == "scan:[clamav]:10025"
    assert config["receive_override_options"] == "no_address_mappings"
    assert config["smtpd_milters"] == "inet:dkim:10028"
    assert config["milter_default_action"] == "tempfail"
    # A deadline per line: a client that never ends one does not hold a process.
    assert (config["smtpd_timeout"], config["smtpd_per_record_deadline"]) == ("60s", "yes")
    assert "smtpd_milters" not in main_cf(settings(dkim_milter_address=""))
    master = master_cf(after)
    assert master.startswith("smtp       inet       n   -   n   -     -   smtpd\npickup")
    assert "scan       unix" in master and "smtp_send_xforward_command=yes" in master
    assert "smtp_connection_cache_on_demand=no" in master  # replicas share a burst
    assert "no_milters" in master.split("10027", 1)[1]  # the milter ran on port 25


def test_before_queue_port_25_proxies_through_the_filters() -> None:
    before = settings(content_filter_address="clamav:10025", relay_timeout="120")
    config = main_cf(before)
    assert "content_filter" not in config and "receive_override_options" not in config
    assert config["smtpd_milters"] == "inet:dkim:10028"  # for 10027, which queues the mail
    master = master_cf(before)
    smtp, reinjection = master.split("\n10027", 1)
    assert "-o smtpd_proxy_filter=inet:clamav:10025\n" in smtp
    assert "-o smtpd_proxy_options=speed_adjust\n" in smtp
    assert "-o smtpd_proxy_timeout=180s\n" in smtp  # longer than the filters' own deadline
    assert "-o smtpd_milters=\n" in smtp  # a proxying smtpd shows milters nothing
    assert "scan       unix" not in master
    assert "receive_override_options=no_unknown_recipient_checks,no_header_body_checks\n" \
        in reinjection  # milters and address mappings happen here


def test_reinjection_port_is_open_to_the_filters_only() -> None:
    master = master_cf(settings(filter_subnet="10.20.30.0/24", reinjection_port="10027"))
    block = master.split("10027", 1)[1]
    assert "-o content_filter=\n" in block
    assert "-o smtpd_recipient_restrictions=permit_mynetworks,reject" in block
    assert "-o smtpd_client_restrictions=permit_mynetworks,reject" in block
    assert "-o mynetworks=!10.20.30.1,10.20.30.0/24" in block  # the gateway is the host


def test_mailboxes_and_delivery() -> None:
    table = mailbox_map(settings(mailboxes="bob@secumail.test, @example.net"))
    assert table.splitlines() == [
        "postmaster@secumail.test secumail.test/postmaster/",
        "postmaster@example.net example.net/postmaster/",
        "bob@secumail.test secumail.test/bob/",
        "@example.net example.net/@catchall/",
    ]
    reports = mailbox_map(settings(dmarc_rua_address="dmarc-rua")).splitlines()
    assert "dmarc-rua@example.net example.net/dmarc-rua/" in reports  # it exists, for others
    assert main_cf(settings())["virtual_mailbox_domains"] == "secumail.test, example.net"
    relayed = main_cf(
        settings(delivery_transport="lmtp:inet:dovecot:24", relayhost="[smarthost]:587")
    )
    assert relayed["virtual_transport"] == "lmtp:inet:dovecot:24"
    assert relayed["relayhost"] == "[smarthost]:587"


def test_render_writes_every_file() -> None:
    files = render(settings())
    assert set(files) == {"main.cf", "master.cf", "virtual_mailboxes", "own_domains",
                          "outbound_clients"}
    assert files["own_domains"].startswith("secumail.test REJECT 5.7.1 Sender address forged")
    assert all(text.endswith("\n") for text in files.values())


def test_our_own_hosts_mail_is_counted_before_it_is_let_through() -> None:
    """Outbound limits: the trusted networks go to a restriction class that asks the policy
    service, ahead of permit_mynetworks; outside clients never reach it."""
    config = main_cf(settings(trust_docker_host="true"))
    assert config["smtpd_relay_restrictions"] == (
        "check_client_access cidr:/etc/postfix/outbound_clients, permit_mynetworks, "
        "permit_sasl_authenticated, reject_unauth_destination")
    assert config["smtpd_restriction_classes"] == "secumail_outbound"
    assert config["secumail_outbound"] == "check_policy_service inet:policy:10023"
    assert render(settings(trust_docker_host="true"))["outbound_clients"] == (
        "127.0.0.0/8 secumail_outbound\n::1/128 secumail_outbound\n"
        "172.29.124.1/32 secumail_outbound\n")
    # The re-injection port keeps its own restrictions: filtered mail is not counted twice.
    assert "  -o smtpd_relay_restrictions=permit_mynetworks,reject" in master_cf(settings())
    off = main_cf(settings(outbound_limits=""))
    assert off["smtpd_relay_restrictions"] == (
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination")
    assert "smtpd_restriction_classes" not in off


def test_mail_to_other_domains_follows_their_mta_sts_and_dane_demands() -> None:
    config = main_cf(settings())
    assert config["smtp_tls_policy_maps"] == "socketmap:inet:127.0.0.1:8461:postfix"
    assert config["smtp_tls_security_level"] == "dane"
    assert config["smtp_dns_support_level"] == "dnssec"
    assert config["smtp_tls_CAfile"] == "/etc/ssl/certs/ca-certificates.crt"
    off = main_cf(settings(outbound_mta_sts="false", outbound_dane="false"))
    assert off["smtp_tls_policy_maps"] == ""
    assert off["smtp_tls_security_level"] == "may" and off["smtp_dns_support_level"] == ""


def test_the_hop_to_the_filters_asks_no_tls_policy() -> None:
    """After-queue, the scan transport is an smtp client too: the filters are inside the
    stack, with nothing to look up for them."""
    master = master_cf(settings(filter_mode="after-queue"))
    lines = master[master.index("\nscan ") + 1:].splitlines()
    options = itertools.takewhile(lambda line: line.startswith(" "), lines[1:])
    scan = "\n".join(options) + "\n"
    for option in ("smtp_tls_security_level=none", "smtp_tls_policy_maps=",
                   "smtp_dns_support_level="):
        assert f"  -o {option}\n" in scan
