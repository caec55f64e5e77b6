# Redis for greylisting state shared by several policy replicas (compose profile "redis"),
# password-protected (redis-entrypoint.sh).
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -m 1777 /run/secumail/redis
COPY services/policy/redis-entrypoint.sh /usr/local/bin/redis-entrypoint
USER redis
EXPOSE 6379
HEALTHCHECK --interval=10s --timeout=5s \
  CMD ["sh", "-c", "REDISCLI_AUTH=$(cat ${REDIS_PASSWORD_FILE:-/run/secumail/redis/password}) redis-cli ping | grep -q PONG"]
CMD ["redis-entrypoint"]
