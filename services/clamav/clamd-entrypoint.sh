#!/bin/sh
# Signatures: with none in the volume, fetch them first (clamd refuses to start without);
# then keep them current with freshclam in the background, unless FRESHCLAM=no (tests).
set -eu
if [ "${FRESHCLAM:-yes}" = "yes" ]; then
    if ! ls /var/lib/clamav/*.c[lv]d >/dev/null 2>&1; then
        freshclam --foreground --stdout
    fi
    freshclam --daemon --checks=12 --stdout &
fi
exec clamd --foreground --config-file=/etc/clamav/clamd.conf
