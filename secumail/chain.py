"""The chain, described once: each hop in mail order, where its upstream reaches it, how it
is probed, the header it adds to every message it passes, and where it passes mail on.

The gateway derives its health checks, the chain canary's expectations and where a
quarantined message is released to from this list; the services read the same settings.

The chain canary (gateway/canary.py) is a message through every hop to the probe mailbox,
marked with its token in a `PROBE_HEADER` header, by which the Postfix container's agent
finds it there (services/postfix/exporter.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from secumail.netaddr import HostPort
from secumail.settings import Settings

# The header that carries the chain canary's token (32 hex digits).
PROBE_HEADER = "X-SecuMail-Probe"


@dataclass(frozen=True)
class Hop:
    service: str  # the compose service name, and the `service` label of its metrics
    address: str  # where it is reached: host:port from the settings, or a unix socket path
    probe: str  # which of secumail.probes.PROBES checks it
    header: str | None = None  # the header it adds to every message it passes
    next_hop: HostPort | None = None  # where a filter passes clean (and released) mail
    metrics: bool = True  # whether its replicas serve /metrics on the metrics port


def chain(settings: Settings) -> list[Hop]:
    """The hops these settings make, in mail order."""
    hops = [
        Hop("postfix", str(settings.postfix_address), "banner"),
        Hop("policy", str(settings.policy_address), "policy",
            header="Received-SPF" if settings.spf_enabled else None),
    ]
    if settings.dkim_milter_address:
        hops.append(Hop("dkim", settings.dkim_milter_address, "milter",
                        header="Authentication-Results"))
    hops += [
        Hop("clamav", str(settings.content_filter_address), "smtp", header="X-AV-Checked",
            next_hop=settings.clamav_next_hop),
        # The spamd filter is reached where the clamav filter sends its mail.
        Hop("spamd", str(settings.clamav_next_hop), "smtp", header="X-Spam-Status",
            next_hop=settings.spamd_next_hop),
        Hop("clamd", settings.clamd_address, "clamd", metrics=False),
        Hop("spamassassin", settings.spamassassin_address, "spamd", metrics=False),
    ]
    return hops
