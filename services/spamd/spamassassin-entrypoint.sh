#!/bin/sh
# spamd, with two helpers in the background that never hold up its start:
# - Bayes' state for the gateway (/health, metrics): what `sa-learn --dump magic` says,
#   written beside the socket (/run/spamd/bayes, JSON) at start and every
#   BAYES_STATUS_INTERVAL seconds (300; each look costs sa-learn about a second of CPU);
# - rules kept current: rules-update (sa-update, lint) at start and every
#   SA_UPDATE_INTERVAL seconds (a day); when the rules spamd should load changed (this
#   replica's update or another's, in the shared volume), spamd reloads them (SIGHUP).
#   Offline, it says why in the log and in /run/spamd/rules (the gateway's /health).
set -eu
VERSION=$(perl -MMail::SpamAssassin -e 'print Mail::SpamAssassin::Version()')
ACTIVE=/var/lib/spamassassin/updates/$VERSION/active
mkdir -p "$(dirname "$ACTIVE")"
[ -L "$ACTIVE" ] || ln -s /usr/share/spamassassin "$ACTIVE"
rm -f /run/spamd/spamd.sock  # a socket left by a killed spamd would stop this one listening
write_bayes_status() {
    sa-learn --dump magic 2>/dev/null | awk -v now="$(date +%s)" '
        /non-token data: nspam$/ { spam = $3 }
        /non-token data: nham$/ { ham = $3 }
        /non-token data: ntokens$/ { tokens = $3 }
        /non-token data: newest atime$/ { newest = $3 }
        END { printf "{\"spam\": %d, \"ham\": %d, \"tokens\": %d, \"newest\": %d, \"checked\": %d}\n",
              spam, ham, tokens, newest, now }' > /run/spamd/bayes.new \
        && mv /run/spamd/bayes.new /run/spamd/bayes
}
(
    sleep 5
    while true; do
        write_bayes_status || true
        sleep "${BAYES_STATUS_INTERVAL:-300}"
    done
) &
SPAMD=$$  # this shell's PID, spamd's once it is exec'd below
(
    loaded=$(readlink "$ACTIVE")
    while true; do
        rules-update || true
        if [ "$(readlink "$ACTIVE")" != "$loaded" ]; then
            loaded=$(readlink "$ACTIVE")
            echo "spamassassin-entrypoint: reloading spamd with the rules in $loaded" >&2
            kill -HUP "$SPAMD" || true
        fi
        sleep "${SA_UPDATE_INTERVAL:-86400}"
    done
) &
# shellcheck disable=SC2086  # SPAMD_OPTIONS is a list of options
exec spamd --socketpath=/run/spamd/spamd.sock --configpath="$ACTIVE" --socketmode=0666 -x --allow-tell \
    --syslog=stderr $SPAMD_OPTIONS
