#!/usr/bin/env bash
# The full proof under load and faults: 10,000 messages (1 KB to 1 MB, 20 sessions) through
# the compose stack while a clamav replica is killed, clamd, spamd, the policy service and
# Redis are stopped in turn, Postfix is restarted with mail queued, and last the stack is
# upgraded from the previous commit's images (SECUMAIL_FAULT_UPGRADE_FROM). Prints the figures
# (messages/s, drain times, lost, duplicated). Needs the Docker engine of
# scripts/install-docker.sh; one compose stack at a time (the lock), about 20 minutes.
#   bash bench/fault_run.sh            SECUMAIL_FAULT_MESSAGES=2000 bash bench/fault_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SECUMAIL_FAULT_MESSAGES="${SECUMAIL_FAULT_MESSAGES:-10000}"
# The upgrade step starts from this revision's compose files and images (built here).
export SECUMAIL_FAULT_UPGRADE_FROM="${SECUMAIL_FAULT_UPGRADE_FROM:-HEAD~1}"
exec flock -o /tmp/secumail-docker.lock .venv/bin/pytest -s -q -p no:cacheprovider \
  tests/e2e/test_faults.py "$@"
