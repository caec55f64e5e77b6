# Every SecuMail image that runs Python, one stage each over one shared base, so that the
# base is written once and built once: compose builds a service with `target: <service>`.
# (Postfix comes last: Docker's classic builder builds every stage before the target.)
# (clamd, spamassassin, redis and prometheus run no Python: their Dockerfiles are beside
# their services.)

# ---- the shared base: Python, the pinned dependencies, SecuMail itself, a user of its own
FROM debian:bookworm-slim AS python
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PATH=/opt/secumail/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10000 secumail \
 && useradd --system --uid 10000 --gid secumail --home-dir /var/lib/secumail \
      --shell /usr/sbin/nologin secumail \
 && install -d -o secumail -g secumail /var/lib/secumail
# Dependencies first (pinned in pyproject.toml): a code change does not reinstall them.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/secumail \
 && /opt/secumail/bin/pip install --no-cache-dir $(python3 -c "import tomllib; \
      print(*tomllib.load(open(\"/src/pyproject.toml\", \"rb\"))[\"project\"][\"dependencies\"])")
COPY README.md /src/
COPY secumail /src/secumail
COPY services /src/services
COPY gateway /src/gateway
RUN /opt/secumail/bin/pip install --no-cache-dir --no-deps /src && rm -rf /src

# ---- policy (10023): greylisting, SPF, DNSBL.
FROM python AS policy
# /run/secumail/redis: the redis-auth volume (Redis's password), writable by Redis whichever
# image made it.
RUN install -d -m 1777 /run/secumail/redis
USER secumail
EXPOSE 10023 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["secumail-probe", "policy", "127.0.0.1:10023"]
CMD ["secumail-policy"]

# ---- dkim (10028): the DKIM milter. Keys live on a volume: one folder per signing domain.
FROM python AS dkim
RUN install -d -o secumail -g secumail -m 0700 /var/lib/secumail/dkim /var/lib/secumail/dmarc
USER secumail
VOLUME ["/var/lib/secumail/dkim"]
EXPOSE 10028 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["secumail-probe", "milter", "127.0.0.1:10028"]
CMD ["secumail-dkim"]

# ---- clamav (10025): the ClamAV content filter; clamd runs in its own container
# (services/clamav/clamd.Dockerfile). /run/clamav: the volume with clamd's socket, writable
# by clamd whichever image made it.
FROM python AS clamav
# libarchive: the attachment rules look inside zip, 7z, rar, tar, cab... archives.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libarchive13 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o secumail -g secumail /var/lib/secumail/quarantine \
 && install -d -m 1777 /run/clamav
USER secumail
EXPOSE 10025 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["secumail-probe", "smtp", "127.0.0.1:10025"]
CMD ["secumail-clamav"]

# ---- spamd (10026): the SpamAssassin content filter; spamd runs in its own container
# (services/spamd/spamassassin.Dockerfile), its socket in /run/spamd.
FROM python AS spamd
RUN install -d -o secumail -g secumail /var/lib/secumail/quarantine \
 && install -d -o secumail -g secumail -m 0700 /var/lib/secumail/dmarc \
 && install -d -m 1777 /run/spamd
USER secumail
EXPOSE 10026 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["secumail-probe", "smtp", "127.0.0.1:10026"]
CMD ["secumail-spamd"]

# ---- gateway (8080): health, metrics, chain probe, admin API, message tracking. It shares
# the greylist, quarantine and DKIM keys volumes with the services that own them, as the
# same user, the scanners' socket volumes (probes) and Redis's password; the tracking
# store is its own.
FROM python AS gateway
RUN install -d -o secumail -g secumail /var/lib/secumail/quarantine \
 && install -d -o secumail -g secumail -m 0700 /var/lib/secumail/dkim \
      /var/lib/secumail/tracking /var/lib/secumail/dmarc \
 && install -d -m 1777 /run/clamav /run/spamd /run/secumail/redis
USER secumail
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["secumail-probe", "http", "127.0.0.1:8080"]
CMD ["secumail-gateway"]

# ---- postfix (25, 10027): Debian's Postfix under secumail-postfix, which renders its
# configuration from the settings at every start.
FROM python AS postfix
RUN echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
 && apt-get update \
 && apt-get install -y --no-install-recommends postfix \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 5000 vmail \
 && useradd --system --uid 5000 --gid vmail --home-dir /var/mail/vhosts \
      --shell /usr/sbin/nologin vmail
# postfix-mta-sts-resolver: destinations' MTA-STS policies (services/postfix/outbound_tls.py).
COPY pyproject.toml /tmp/
RUN /opt/secumail/bin/pip install --no-cache-dir $(python3 -c "import tomllib; \
      extras = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['optional-dependencies']; \
      print(*extras['mta-sts'])") \
 && rm /tmp/pyproject.toml \
 && install -d -o 5054 -g 5054 -m 0700 /var/lib/secumail/mta-sts \
 && python3 -c "from secumail.settings import Settings; \
      from services.postfix.main import write_config; write_config(Settings())"
# The image carries main.cf and master.cf rendered from the default settings, so that
# `postconf` answers even before the first start renders the real ones.
# The queue and the mailboxes live on volumes: a restarted container loses nothing.
VOLUME ["/var/spool/postfix", "/var/mail/vhosts"]
# 9100: Postfix's metrics and the probe mailbox (a child of the supervisor, run as vmail),
# for the gateway only; never published.
EXPOSE 25 10027 9100
# Postfix's master process runs as root (it binds port 25 and drops privileges per service).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["secumail-probe", "smtp", "127.0.0.1:25"]
STOPSIGNAL SIGTERM
CMD ["secumail-postfix"]
