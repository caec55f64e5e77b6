#!/bin/sh
# The gateway's metrics token (SECUMAIL_METRICS_TOKEN, from .env) goes to the file
# prometheus.yml names: Prometheus reads credentials from files, not from the environment.
# Empty when no token is set; the gateway then asks for none. On Docker Swarm the token is
# a secret, /run/secrets/secumail_metrics_token.
set -eu
umask 077
token=${SECUMAIL_METRICS_TOKEN:-}
secret=/run/secrets/secumail_metrics_token
if [ -z "$token" ] && [ -r "$secret" ]; then token=$(cat "$secret"); fi
printf '%s' "$token" > /var/lib/prometheus/secumail-metrics-token
exec prometheus --config.file=/etc/prometheus/prometheus.yml \
    --storage.tsdb.path=/var/lib/prometheus/metrics2 \
    --web.console.libraries=/usr/share/prometheus/console_libraries \
    --web.console.templates=/usr/share/prometheus/consoles "$@"
