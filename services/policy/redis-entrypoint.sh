#!/bin/sh
# Redis for shared greylisting state, with a password: the one in the redis-auth volume
# (/run/secumail/redis/password), made at first start when the admin has put none there.
# The policy and gateway containers read it from the same volume; no other container has it.
# On Docker Swarm it is a secret instead (REDIS_PASSWORD_FILE=/run/secrets/...).
set -eu
file=${REDIS_PASSWORD_FILE:-/run/secumail/redis/password}
if [ ! -s "$file" ]; then
    umask 022
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$file.new"
    mv "$file.new" "$file"
    echo "redis: made a password in $file"
fi
# The password goes in a config file only this user reads, not on the command line.
# Memory is bounded (REDIS_MAXMEMORY, 256mb): when full, Redis evicts the keys closest to
# their expiry first (volatile-ttl): never-passed greylist triplets (they last their retry
# window) before passed ones and the auto-whitelist (max_age), and never a key without an
# expiry (the admin's whitelist). If only those are left, writes fail and the policy
# service defers (451): mail waits, nothing is lost.
umask 077
config=$(mktemp)
printf 'bind 0.0.0.0\nprotected-mode yes\ndir %s\nappendonly yes\nmaxmemory %s\nmaxmemory-policy volatile-ttl\nrequirepass %s\n' \
    "${REDIS_DIR:-/var/lib/redis}" "${REDIS_MAXMEMORY:-256mb}" "$(cat "$file")" > "$config"
exec redis-server "$config"
