"""The content filters' metrics, on /metrics of each filter (label `filter`: clamav, spamd)."""

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "secumail_filter_messages", "Messages handled by a content filter", ["filter", "verdict"]
)
SCAN_SECONDS = Histogram(
    "secumail_filter_scan_duration_seconds", "Time the scanner took for one message",
    ["filter"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
BACKEND_ERRORS = Counter(
    "secumail_filter_backend_errors", "Scanner (clamd, spamd) failures", ["filter"]
)
NEXT_HOP_ERRORS = Counter(
    "secumail_filter_next_hop_errors", "Next hop unreachable or broken off", ["filter"]
)
RETRIED_ON_NEW_CONNECTION = Counter(
    "secumail_filter_retried_on_new_connection",
    "Transactions a kept next-hop connection answered 4xx (at MAIL or at the end of the "
    "message), then taken on another connection", ["filter"]
)
UNACKNOWLEDGED = Counter(
    "secumail_filter_unacknowledged",
    "Messages the next hop accepted when the client left before hearing so (RFC 1047): "
    "recorded, so that the client's retry is answered without being delivered again",
    ["filter"],
)
CONNECTIONS = Gauge("secumail_filter_connections", "Open SMTP connections", ["filter"])
QUARANTINE_FULL = Counter(
    "secumail_filter_quarantine_full",
    "Messages not quarantined for want of room (SECUMAIL_QUARANTINE_MAX_*): refused 452 "
    "before queue, dropped after queue",
    ["filter"],
)
BACKSCATTER_AVOIDED = Counter(
    "secumail_filter_backscatter_avoided",
    "Refusals turned into quarantine after queueing: a bounce would go to a forged sender",
    ["filter"],
)
