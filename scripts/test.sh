#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs the
# linters and every test (unit, service, Postfix). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -ra "$@"
