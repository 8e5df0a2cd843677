#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the project into it.
# Usage: source scripts/setup_env.sh EXTRAS   (EXTRAS e.g. "test" or "" ); sets $PY.
set -euo pipefail
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately; install it when we may, otherwise say what to do.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    else
      echo "error: 'python3 -m venv' failed; install it first: sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
fi
PY="$VENV/bin/python"
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
"$PY" -m pip install -q --disable-pip-version-check -e "$spec"
