# The tests' validating resolver, Postfix's DNS server in the test stack: nsd serves the
# DNSSEC-signed zone dane.test (made by the tests) on loopback, and unbound, trusting the
# zone's key (its DS record, beside the zone), asks nsd for it and validates every answer,
# so that DANE is in force there. Every other name unbound asks of the tests' dnsmasq
# (tests/e2e/dns/dnsmasq.conf), unvalidated (no root trust anchor: nothing leaves).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends unbound nsd \
 && rm -rf /var/lib/apt/lists/*
COPY tests/e2e/dns/unbound.conf /etc/unbound/secumail-test.conf
COPY tests/e2e/dns/nsd.conf /etc/nsd/secumail-test.conf
EXPOSE 53/udp 53/tcp
CMD ["sh", "-c", "nsd -c /etc/nsd/secumail-test.conf && exec unbound -d -c /etc/unbound/secumail-test.conf"]
