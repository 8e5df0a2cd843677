#!/usr/bin/env bash
# The test command: set-up from scratch (idempotent), lint, then the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# Two cores run the suite in about two thirds of the time one does (most tests are compile- or
# subprocess-bound): one worker per core, at most 4 and one per 6 GB of memory (a worker holds
# up to 5 GB). `bash scripts/test.sh -n 0` runs it in one process.
workers="$("$PY" - <<'PYEOF'
import os
cores = len(os.sched_getaffinity(0))
mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print(max(1, min(cores, 4, int(mem_gb // 6))))
PYEOF
)"
"$PY" -m pytest -q -n "$workers" --dist worksteal "$@"
