#!/bin/sh
# One look for newer SpamAssassin rules, and the choice of the rules spamd loads.
#   1. sa-update (unless SECUMAIL_SA_UPDATE=no): SpamAssassin's channel, GPG-checked, from
#      its mirrors or SECUMAIL_SA_UPDATE_MIRROR (a private mirror: sa-update --forcemirror),
#      into the rules volume; sa-update lints what it downloads and keeps the old rules when
#      that fails.
#   2. When the channel's rules changed, they are linted again with this site's config (our
#      scores, the admin's local.cf) and copied aside; only then does $ACTIVE, which spamd's
#      --configpath follows, point at the copy. A rule set that fails lint is never loaded:
#      $ACTIVE keeps pointing at the last good set (at first, the image's own rules).
# Writes what it found to /run/spamd/rules (JSON, for the gateway's /health) and its log.
# Replicas share the volume: one at a time (flock). Exit 0: $ACTIVE changed; 1: it did not.
set -u
VERSION=$(perl -MMail::SpamAssassin -e 'print Mail::SpamAssassin::Version()')
UPDATES=/var/lib/spamassassin/updates/$VERSION  # a new SpamAssassin starts from its own rules
CHANNEL=$UPDATES/channel  # sa-update's --updatedir
ACTIVE=$UPDATES/active    # symlink: the rules spamd loads
IMAGE_RULES=/usr/share/spamassassin
STATUS=/run/spamd/rules
MIRROR=${SECUMAIL_SA_UPDATE_MIRROR:-}
KEYS=/var/lib/spamassassin/sa-update-keys  # SpamAssassin's signing key (Debian's package)

say() { echo "rules-update: $*" >&2; }

mkdir -p "$UPDATES"
exec 9>"$UPDATES/lock"
flock 9
[ -L "$ACTIVE" ] || ln -s "$IMAGE_RULES" "$ACTIVE"
before=$(readlink "$ACTIVE")

error=""
if [ "${SECUMAIL_SA_UPDATE:-yes}" = "yes" ]; then
    # shellcheck disable=SC2086  # the mirror option is one word or none
    output=$(sa-update -v --updatedir "$CHANNEL" --gpghomedir "$KEYS" \
             ${MIRROR:+--forcemirror "$MIRROR"} 2>&1)
    code=$?
    case $code in
        0) say "sa-update installed new rules from ${MIRROR:-SpamAssassin's mirrors}" ;;
        1) ;;  # no newer rules
        *) reason=$(printf '%s\n' "$output" | grep -v '^Update failed' | tail -n 1)
           error="sa-update could not update the rules from ${MIRROR:-SpamAssassin's mirrors} (exit $code: ${reason:-no output}); set SECUMAIL_SA_UPDATE_MIRROR to a private mirror, or SECUMAIL_SA_UPDATE=no"
           say "$error" ;;
    esac
fi

# The channel's rules, when complete: linted with the site's config, then made active.
if [ -f "$CHANNEL/updates_spamassassin_org.cf" ]; then
    digest=$(find "$CHANNEL" -type f \( -name '*.cf' -o -name '*.pre' \) | sort \
             | xargs cat | sha256sum | cut -c1-16)
    candidate=$UPDATES/rules-$digest
    if [ "$before" != "$candidate" ]; then
        rm -rf "$candidate.new"
        cp -a "$CHANNEL" "$candidate.new"
        if lint=$(spamassassin --lint --configpath="$candidate.new" 2>&1); then
            rm -rf "$candidate"
            mv "$candidate.new" "$candidate"
            ln -s "$candidate" "$ACTIVE.new" && mv -T "$ACTIVE.new" "$ACTIVE"
            say "rules $digest pass lint: spamd loads them"
            # the set before and this one stay: a replica may still read the old one
            for old in "$UPDATES"/rules-*; do
                case $old in "$candidate" | "$before") ;; *) rm -rf "$old" ;; esac
            done
        else
            rm -rf "$candidate.new"
            first=$(printf '%s\n' "$lint" | grep -v 'issues detected' | grep -m 1 'warn:' \
                    | sed 's/^.*warn: //')
            kept=$( [ "$before" = "$IMAGE_RULES" ] && echo "the image's rules" \
                    || basename "$before")
            lint_error="new rules $digest fail spamassassin --lint, not loaded (${first:-see spamassassin --lint}); spamd keeps $kept"
            say "$lint_error"
            error="${error:+$error; }$lint_error"
        fi
    fi
fi

after=$(readlink "$ACTIVE")
printf '{"version": "%s", "rules": "%s", "checked": %s, "error": "%s"}\n' "$VERSION" \
    "$( [ "$after" = "$IMAGE_RULES" ] && echo image || basename "$after")" "$(date +%s)" \
    "$(printf '%s' "$error" | tr -d '"\\' | tr '\n' ' ' | cut -c1-400)" > "$STATUS.new" \
    && mv "$STATUS.new" "$STATUS"
[ "$after" != "$before" ]
