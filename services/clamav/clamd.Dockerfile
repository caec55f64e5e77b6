# clamd, the ClamAV daemon the filter streams mail to (INSTREAM over the unix socket
# /run/clamav/clamd.sock, in a volume shared with the filter), and freshclam, which keeps its
# signatures current. Tests mount a signature folder of their own instead.
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends clamav-daemon clamav-freshclam clamdscan \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o clamav -g clamav /var/lib/clamav \
 && install -d -o clamav -g clamav -m 1777 /run/clamav
COPY services/clamav/clamd.conf /etc/clamav/clamd.conf
COPY services/clamav/clamd-entrypoint.sh /usr/local/bin/clamd-entrypoint
USER clamav
VOLUME ["/var/lib/clamav"]
# The full database takes 15-25 s and about 1.2 GiB to load.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["clamdscan", "--ping", "1"]
CMD ["clamd-entrypoint"]
