#!/usr/bin/env bash
# Provides what the compose tests need on a Debian machine with no container registry:
# Docker's engine and Compose (v1 from Debian's packages, v2 as below), a running dockerd, and a local
# `debian:bookworm-slim` base image made with debootstrap from the same Debian mirror apt
# uses. Safe to run again: each step is skipped when already done.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# The mirror apt itself uses (deb822 "URIs:" or one-line "deb URL" entries).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+' | grep -v security | head -1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

# Compose v2, as users run it (`docker compose`). Debian bookworm ships only v1 (its
# docker-compose stays: the tests check that v1 still reads compose.yaml); the next
# release's docker-compose package is v2, a static binary needing only libc6 >= 2.34, which
# bookworm has. Taken from the same mirror, checked against its SHA-256, installed as the
# Docker CLI plugin. Should the pinned build leave the mirror, the release's current one is
# taken, checked against the SHA-256 of the release's signed package index.
COMPOSE_V2_DEB=pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb
COMPOSE_V2_SHA256=47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
PLUGINS=/usr/local/lib/docker/cli-plugins
if ! docker compose version >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
    tmp=$(mktemp -d)
    if ! curl -fsSL "$mirror/$COMPOSE_V2_DEB" -o "$tmp/compose.deb"; then
        curl -fsSL "$mirror/dists/trixie/main/binary-amd64/Packages.xz" | xz -dc \
            | awk '/^Package: docker-compose$/{p=1} p&&/^$/{exit} p' >"$tmp/entry"
        COMPOSE_V2_DEB=$(sed -n 's/^Filename: //p' "$tmp/entry")
        COMPOSE_V2_SHA256=$(sed -n 's/^SHA256: //p' "$tmp/entry")
        curl -fsSL "$mirror/$COMPOSE_V2_DEB" -o "$tmp/compose.deb"
    fi
    echo "$COMPOSE_V2_SHA256  $tmp/compose.deb" | sha256sum -c --quiet
    dpkg-deb -x "$tmp/compose.deb" "$tmp/root"
    $SUDO install -D -m 0755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" \
        "$PLUGINS/docker-compose"
    rm -rf "$tmp"
    echo "installed $(docker compose version)"
fi

# ip6tables: Docker routes IPv6 to containers itself (DNAT), so that an IPv6 client reaches
# Postfix with its own address (compose.ipv6.yaml, which the compose tests use); Docker's
# userland proxy would hand every one over from the same address. Experimental on Debian's
# Docker 20.10 (the default from 27 on). A dockerd this script started before without it
# (plain `dockerd`) is restarted with it; one started otherwise (systemd) is left as it is,
# and the IPv6 test then skips, saying why.
DOCKERD_FLAGS="--experimental --ip6tables"
if pid=$(pgrep -x dockerd) && [ "$(tr '\0' ' ' </proc/"$pid"/cmdline)" = "dockerd " ]; then
    echo "restarting dockerd with $DOCKERD_FLAGS"
    $SUDO kill "$pid"
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
fi
if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd"
    $SUDO sh -c "nohup dockerd $DOCKERD_FLAGS >/var/log/dockerd.log 2>&1 &"
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /var/log/dockerd.log; exit 1; }
fi

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    root=$(mktemp -d)
    echo "building debian:bookworm-slim with debootstrap from $mirror"
    $SUDO debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
    # The same apt sources as a registry image, security updates included.
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
        "$mirror" "$mirror" | $SUDO tee "$root/etc/apt/sources.list" >/dev/null
    # Builds must reach the registries the way the host does: where an intercepting proxy
    # with its own CA stands in between, give the image that CA (and tell pip to use the
    # system bundle, which pip otherwise ignores). Harmless where there is none.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        $SUDO mkdir -p "$root/usr/local/share/ca-certificates" "$root/etc/ssl/certs"
        $SUDO cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        $SUDO cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' | $SUDO tee "$root/etc/pip.conf" >/dev/null
    fi
    $SUDO rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    $SUDO tar -C "$root" -c . | docker import - debian:bookworm-slim >/dev/null
    $SUDO rm -rf "$root"
fi
echo "docker ready: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
