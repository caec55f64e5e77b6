# SpamAssassin's spamd, which the spamd filter asks over SPAMC on the unix socket
# /run/spamd/spamd.sock, in a volume shared with the filter: spamd parses hostile content,
# so it shares no network with any SecuMail service. Runs as Debian's debian-spamd user.
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends spamd spamc ca-certificates gpg gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o debian-spamd -g debian-spamd -m 1777 /run/spamd \
 && install -d -o debian-spamd -g debian-spamd -m 0750 /var/lib/spamassassin/bayes \
    /var/lib/spamassassin/updates
# One Bayes database for every replica on a host (the bayes volume), learned from the admin's
# releases and reports over SPAMC TELL (--allow-tell: only the spamd filter and the gateway
# reach the socket); tokens expire on their own (bayes_auto_expire), so it stays bounded.
# SecuMail's settings, read before local.cf (which the admin may replace: README, "Teaching
# SecuMail"): Bayes, and scores chosen on the public corpus's tuning half.
COPY services/spamd/bayes.cf /etc/spamassassin/60_secumail-bayes.cf
COPY services/spamd/scores.cf /etc/spamassassin/60_secumail-scores.cf
# Rules kept current (sa-update at start and daily, linted before spamd loads them), in the
# sa-rules volume: replicas share them, and they survive a recreate.
COPY services/spamd/rules-update.sh /usr/local/bin/rules-update
COPY services/spamd/spamassassin-entrypoint.sh /usr/local/bin/spamassassin-entrypoint
VOLUME ["/var/lib/spamassassin/bayes", "/var/lib/spamassassin/updates"]
USER debian-spamd
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["spamc", "-U", "/run/spamd/spamd.sock", "-K"]
# SPAMD_OPTIONS: -L (local tests only) in the test overlay; children as cores allow.
ENV SPAMD_OPTIONS="--max-children=2 --min-children=1"
CMD ["spamassassin-entrypoint"]
