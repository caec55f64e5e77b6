#!/bin/sh
# clamd refuses to start without signatures. With none in the volume, freshclam fetches them
# first: from ClamAV's mirror, or from SECUMAIL_CLAMAV_MIRROR (a private mirror, freshclam's
# PrivateMirror: an http(s) URL serving the .cvd files). While it cannot, this container says
# why every CLAMAV_RETRY seconds (60) in its log and in /run/clamav/status, which the
# gateway's health shows, instead of exiting into a silent restart loop. Then freshclam
# keeps them current in the background, unless FRESHCLAM=no (tests, or a signature folder
# mounted on /var/lib/clamav: README, "ClamAV signatures without the public mirror").
set -eu
STATUS=/run/clamav/status
RETRY=${CLAMAV_RETRY:-60}
MIRROR=${SECUMAIL_CLAMAV_MIRROR:-}
CONFIG=/tmp/freshclam.conf
FIRST=/tmp/freshclam-first.conf

have_signatures() {
    ls /var/lib/clamav 2>/dev/null | grep -Eq '\.(cvd|cld|cud|ndb|hdb|hsb|ldb|mdb|msb|cdb|yar|yara)$'
}

waiting() {
    echo "clamd-entrypoint: $1; trying again in ${RETRY} s" >&2
    echo "$1" > "$STATUS"
    sleep "$RETRY"
}

if [ "${FRESHCLAM:-yes}" = "yes" ]; then
    grep -v '^PrivateMirror' /etc/clamav/freshclam.conf > "$CONFIG"
    if [ -n "$MIRROR" ]; then
        echo "PrivateMirror $MIRROR" >> "$CONFIG"
        echo "clamd-entrypoint: signatures from the private mirror $MIRROR" >&2
    fi
    # The first download: one attempt each time (this loop retries, and says why).
    grep -v '^MaxAttempts' "$CONFIG" > "$FIRST"
    echo "MaxAttempts 1" >> "$FIRST"
    while ! have_signatures; do
        if output=$(freshclam --foreground --stdout --config-file="$FIRST" 2>&1); then
            printf '%s\n' "$output"
            break
        fi
        printf '%s\n' "$output" | tail -n 3 >&2
        # curl's own words ("Couldn't resolve host name"), else freshclam's last error.
        reason=$(printf '%s\n' "$output" | grep -o 'Message: .*' | tail -n 1 | sed 's/^Message: //')
        [ -n "$reason" ] || reason=$(printf '%s\n' "$output" | grep 'ERROR' | tail -n 1 \
                                     | sed 's/^.*-> *//')
        waiting "no ClamAV signatures: freshclam could not download them from ${MIRROR:-ClamAV's mirror} (${reason:-see its output above}); set SECUMAIL_CLAMAV_MIRROR to a private mirror, or mount a signature folder"
    done
    freshclam --daemon --checks=12 --stdout --config-file="$CONFIG" &
fi
while ! have_signatures; do
    waiting "no ClamAV signatures in /var/lib/clamav and FRESHCLAM=no: mount a signature folder there"
done
rm -f "$STATUS"
exec clamd --foreground --config-file=/etc/clamav/clamd.conf
