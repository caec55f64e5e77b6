#!/bin/sh
# The gateway's metrics token (SECUMAIL_METRICS_TOKEN, from .env) goes to the file
# prometheus.yml names: Prometheus reads credentials from files, not from the environment.
# Empty when no token is set; the gateway then asks for none.
set -eu
umask 077
printf '%s' "${SECUMAIL_METRICS_TOKEN:-}" > /var/lib/prometheus/secumail-metrics-token
exec prometheus --config.file=/etc/prometheus/prometheus.yml \
    --storage.tsdb.path=/var/lib/prometheus/metrics2 \
    --web.console.libraries=/usr/share/prometheus/console_libraries \
    --web.console.templates=/usr/share/prometheus/consoles "$@"
