#!/usr/bin/env bash
# Puts the images just built (`docker compose build`) into service, keeping port 25 open for
# all but Postfix's own restart: every other service is replaced first, while Postfix keeps
# taking mail and holding its queue (a message that meets a filter being replaced gets a 4xx
# and its sender retries), then Postfix alone. README, "Upgrading".
# Arguments go to both `up` commands (--force-recreate replaces containers whose image did not
# change). UPGRADE_COMPOSE: the compose command, when it needs files or a project name.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a compose <<< "${UPGRADE_COMPOSE:-docker compose}"
mapfile -t others < <("${compose[@]}" config --services | grep -vx postfix)
"${compose[@]}" up -d --wait --no-deps "$@" "${others[@]}"
"${compose[@]}" up -d --wait --no-deps "$@" postfix
