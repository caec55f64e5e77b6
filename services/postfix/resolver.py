"""Postfix's resolver, when `SECUMAIL_DNS_SERVERS` is set (secumail/dns_forwarder.py says
why): the supervisor binds 127.0.0.1:53 as root, points /etc/resolv.conf at it, and keeps
this child running on those sockets as a user of its own.

    python -m services.postfix.resolver UDP_FD TCP_FD DOCKER_DNS...   (ResolverKeeper's
    command)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

from secumail.dns_forwarder import DOCKER_DNS, Forwarder, resolv_conf, serve
from secumail.logs import log_event, setup_logging
from secumail.netaddr import HostPort, parse_host_port
from secumail.settings import Settings, load_settings
from services.postfix.children import CommandKeeper, in_container

log = logging.getLogger("secumail.postfix.resolver")

RESOLV_CONF = Path("/etc/resolv.conf")
# Docker's own resolv.conf, kept: a restarted container finds ours in its place.
DOCKER_RESOLV_CONF = Path("/etc/resolv.conf.docker")
LISTEN = "127.0.0.1"
# A user of its own (no other process of the container runs as it, so none may signal or
# trace the process that answers Postfix's lookups); no name needed.
RESOLVER_UID = 5053


class ResolverKeeper(CommandKeeper):
    """Binds port 53 on loopback and keeps the forwarder running on it as RESOLVER_UID
    (resolv.conf points at it: until it runs again, Postfix resolves nothing, not even the
    service names)."""

    def __init__(self, docker: list[HostPort], port: int = 53, user: int | None = RESOLVER_UID
                 ) -> None:
        self.docker = docker
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind((LISTEN, port))
        self.tcp.bind((LISTEN, port))
        self.tcp.listen(64)
        fds = (self.udp.fileno(), self.tcp.fileno())
        super().__init__("resolver", [sys.executable, "-m", "services.postfix.resolver",
                                      *map(str, fds), *map(str, docker)], user, pass_fds=fds)


def start_resolver(settings: Settings, resolv: Path = RESOLV_CONF,
                   saved: Path = DOCKER_RESOLV_CONF) -> ResolverKeeper | None:
    """With SECUMAIL_DNS_SERVERS set and in a container: the forwarder started and
    resolv.conf pointed at it (None otherwise: Postfix keeps Docker's resolver)."""
    if not settings.dns_servers or not in_container():
        return None
    if HostPort(LISTEN, 53) in settings.dns_servers:
        log_event(log, "SECUMAIL_DNS_SERVERS names 127.0.0.1:53, Postfix's own forwarder: "
                  "Postfix keeps Docker's resolver", logging.ERROR)
        return None
    if not saved.exists():
        saved.write_text(resolv.read_text())
    text, docker = resolv_conf(saved.read_text(), LISTEN)
    docker = [server for server in docker if server.host != LISTEN] or [DOCKER_DNS]
    keeper = ResolverKeeper(docker)
    keeper.start()
    resolv.write_text(text)
    log_event(log, "postfix resolves through SECUMAIL_DNS_SERVERS",
              servers=",".join(map(str, settings.dns_servers)),
              service_names=",".join(map(str, docker)))
    return keeper


def main() -> None:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    udp = socket.socket(fileno=int(sys.argv[1]))
    tcp = socket.socket(fileno=int(sys.argv[2]))
    forwarder = Forwarder(settings.dns_servers, [parse_host_port(a) for a in sys.argv[3:]],
                          list(settings.subnets.values()), settings.dns_timeout)
    asyncio.run(serve(forwarder, udp, tcp))


if __name__ == "__main__":
    main()
