#!/usr/bin/env bash
# Starts SecuMail's policy service on port 10023 with the settings in .env (see .env.example).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/secumail-policy ] || scripts/install-deps.sh
if [ -f .env ]; then
    set -a; . ./.env; set +a
fi
# Outside a container the state goes next to the checkout, not under /var/lib.
export SECUMAIL_GREYLIST_STORE="${SECUMAIL_GREYLIST_STORE:-sqlite:///$PWD/var/greylist.sqlite}"
exec .venv/bin/secumail-policy
