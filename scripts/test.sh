#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs the
# linters and every test (unit, service with real daemons, compose end to end).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The compose tests need a Docker engine and a local base image (no registry here); where
# none can be had they skip, saying why, and every other test still runs.
scripts/install-docker.sh || echo "no Docker engine could be started: the compose tests will skip"
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -ra "$@"
