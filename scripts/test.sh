#!/usr/bin/env bash
# The test command: set-up from scratch (idempotent), lint, then the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$PY" -m pytest -q "$@"
