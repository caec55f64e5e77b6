#!/bin/sh
# spamd, and Bayes' state for the gateway (/health, metrics): what `sa-learn --dump magic`
# says, written beside the socket (/run/spamd/bayes, JSON) at start and every
# BAYES_STATUS_INTERVAL seconds (300; each look costs sa-learn about a second of CPU).
set -eu
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
# shellcheck disable=SC2086  # SPAMD_OPTIONS is a list of options
exec spamd --socketpath=/run/spamd/spamd.sock --socketmode=0666 -x --allow-tell \
    --syslog=stderr $SPAMD_OPTIONS
