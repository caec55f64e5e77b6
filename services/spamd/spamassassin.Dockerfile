# SpamAssassin's spamd, which the spamd filter asks over SPAMC on 783. Runs as Debian's
# debian-spamd user; compose lets it bind 783 (net.ipv4.ip_unprivileged_port_start).
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends spamd spamc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
USER debian-spamd
EXPOSE 783
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["spamc", "-d", "127.0.0.1", "-p", "783", "-K"]
# SPAMD_OPTIONS: -L (local tests only) in the test overlay; children as cores allow.
ENV SPAMD_OPTIONS="--max-children=2 --min-children=1"
CMD ["sh", "-c", "exec spamd --listen=0.0.0.0:783 --allowed-ips=0.0.0.0/0,::/0 -x --syslog=stderr $SPAMD_OPTIONS"]
