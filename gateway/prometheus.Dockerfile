# Prometheus for the compose profile `prometheus`: Debian's package, scraping the gateway
# (prometheus.yml at the top of the repository). The web UI and API are on 9090.
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /var/lib/prometheus
COPY prometheus.yml /etc/prometheus/prometheus.yml
COPY gateway/prometheus-entrypoint.sh /usr/local/bin/prometheus-entrypoint
USER prometheus
VOLUME ["/var/lib/prometheus"]
EXPOSE 9090
# No curl in the image: bash's /dev/tcp asks /-/healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/healthy HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
CMD ["prometheus-entrypoint"]
