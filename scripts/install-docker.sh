#!/usr/bin/env bash
# Provides what the compose tests need on a Debian machine with no container registry:
# Docker's engine and Compose (v1 from Debian's packages, v2 as below), a running dockerd, and a local
# `debian:bookworm-slim` base image made with debootstrap from the same Debian mirror apt
# uses. Safe to run again: each step is skipped when already done.
#
# No mirror is named here: it is read from apt's sources (the machine's choice, reachable from
# it); a machine with no Debian mirror there stops, saying which files were read. Sourced
# (`source scripts/install-docker.sh`), it only defines its functions: the tests call
# debian_mirror with APT_SOURCES_DIR set to a directory of their own.
set -euo pipefail

# Where apt's sources are; another directory only for the tests.
APT_SOURCES_DIR=${APT_SOURCES_DIR:-/etc/apt}

# apt's source files, in the order apt reads them: sources.list, then sources.list.d's
# *.list and *.sources (one-line and deb822 formats) by name. Other names apt ignores.
apt_source_files() {
    local file
    if [ -f "$APT_SOURCES_DIR/sources.list" ]; then
        echo "$APT_SOURCES_DIR/sources.list"
    fi
    for file in "$APT_SOURCES_DIR"/sources.list.d/*; do
        case $file in
            *.list | *.sources) if [ -f "$file" ]; then echo "$file"; fi ;;
        esac
    done
}

# One line "URI<TAB>suite<TAB>components" for each URI and suite of every enabled binary
# ("deb") entry of these files: one-line entries (options in [...] skipped, # comments) and
# deb822 stanzas (Types:, URIs:, Suites:, Components:, Enabled:, continuation lines).
apt_source_entries() {
    awk '
        function flush(    uri_count, suite_count, i, j, uri_list, suite_list) {
            if (types ~ /(^| )deb( |$)/ && enabled != "no") {
                uri_count = split(uris, uri_list, /[ \t]+/)
                suite_count = split(suites, suite_list, /[ \t]+/)
                for (i = 1; i <= uri_count; i++)
                    for (j = 1; j <= suite_count; j++)
                        print uri_list[i] "\t" suite_list[j] "\t" components
            }
            types = uris = suites = components = enabled = field = ""
        }
        function trim(text) {
            gsub(/^[ \t]+|[ \t]+$/, "", text)
            return text
        }
        function set_field(name, value) {
            if (name == "types") types = trim(types " " value)
            else if (name == "uris") uris = trim(uris " " value)
            else if (name == "suites") suites = trim(suites " " value)
            else if (name == "components") components = trim(components " " value)
            else if (name == "enabled") enabled = tolower(trim(value))
        }
        FNR == 1 { flush(); deb822 = FILENAME ~ /\.sources$/ }
        { sub(/\r$/, "") }
        deb822 && /^#/ { next }
        deb822 && /^[ \t]*$/ { flush(); next }
        deb822 && /^[ \t]/ { set_field(field, $0); next }  # a value continued
        deb822 {
            colon = index($0, ":")
            if (colon == 0) next
            field = tolower(trim(substr($0, 1, colon - 1)))
            set_field(field, substr($0, colon + 1))
            next
        }
        {
            sub(/#.*/, "")
            gsub(/\[[^]]*\]/, " ")  # [arch=amd64 signed-by=...]
            if ($1 != "deb" || NF < 3) next
            components = ""
            for (i = 4; i <= NF; i++) components = components (i > 4 ? " " : "") $i
            print $2 "\t" $3 "\t" components
        }
        END { flush() }
    ' "$@"
}

# The first http(s) URI of the entries in apt's sources (tab-separated lines on stdin) with
# the main component whose suite is `suite` or whose path ends in `path`, without a final /.
# A third-party repository (Docker's .../linux/debian bookworm stable) has no main.
first_uri() {
    local suite=$1 path=$2
    # Reads to the end (no exit): the writer, cut off, would fail the pipeline (pipefail).
    awk -F '\t' -v suite="$suite" -v path="$path" '
        !found && $1 ~ /^https?:\/\// && $3 ~ /(^| )main( |$)/ {
            uri = $1
            sub(/\/+$/, "", uri)
            if ($2 == suite || substr(uri, length(uri) - length(path) + 1) == path) {
                print uri
                found = 1
            }
        }
    '
}

# The Debian mirror apt uses for bookworm (or any .../debian it has), printed; when there is
# none, a message naming the files read, and status 1.
debian_mirror() {
    local files mirror=""
    mapfile -t files < <(apt_source_files)
    if [ ${#files[@]} -gt 0 ]; then
        mirror=$(apt_source_entries "${files[@]}" | first_uri bookworm /debian)
    fi
    if [ -z "$mirror" ]; then
        {
            echo "install-docker.sh: no Debian mirror found in apt's sources."
            if [ ${#files[@]} -gt 0 ]; then
                echo "  read: ${files[*]}"
            else
                echo "  read: none (there is no $APT_SOURCES_DIR/sources.list and no" \
                    "$APT_SOURCES_DIR/sources.list.d/*.list or *.sources)"
            fi
            echo "  wanted: an enabled 'deb' entry with an http(s) URI and the main component," \
                "for the bookworm suite or with a path ending in /debian, such as" \
                "'deb http://<your Debian mirror>/debian bookworm main'."
        } >&2
        return 1
    fi
    echo "$mirror"
}

# The Debian security archive apt uses (bookworm-security, or a .../debian-security);
# nothing when it has none.
debian_security_mirror() {
    local files
    mapfile -t files < <(apt_source_files)
    if [ ${#files[@]} -gt 0 ]; then
        apt_source_entries "${files[@]}" | first_uri bookworm-security /debian-security
    fi
}

main() {
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

    # The mirror apt itself uses, looked up when a step needs it (a machine where every step is
    # done needs none).
    mirror=""

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
        [ -n "$mirror" ] || mirror=$(debian_mirror) || exit 1
        tmp=$(mktemp -d)
        if ! curl -fsSL "$mirror/$COMPOSE_V2_DEB" -o "$tmp/compose.deb"; then
            curl -fsSL "$mirror/dists/trixie/main/binary-amd64/Packages.xz" | xz -dc \
                | awk 'done {next} /^Package: docker-compose$/ {p=1} p && /^$/ {done=1} p' \
                >"$tmp/entry"  # reads to the end: xz, cut off, would fail the pipeline
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
        [ -n "$mirror" ] || mirror=$(debian_mirror) || exit 1
        security=$(debian_security_mirror)
        root=$(mktemp -d)
        echo "building debian:bookworm-slim with debootstrap from $mirror"
        $SUDO debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
        # The same apt sources as a registry image, security updates included when the machine
        # has them (its own security archive: a guessed one that is not there would make every
        # apt-get update in the builds fail).
        {
            printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror"
            if [ -n "$security" ]; then
                printf 'deb %s bookworm-security main\n' "$security"
            else
                echo "no bookworm-security entry in apt's sources: the image has none either" >&2
            fi
        } | $SUDO tee "$root/etc/apt/sources.list" >/dev/null
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
}

# Run, unless sourced (by the tests, for the functions above).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
