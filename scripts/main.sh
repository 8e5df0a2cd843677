#!/usr/bin/env bash
# The main job, from a fresh checkout: set up, train configs/default.py on the default corpus
# (built on first use from Debian's SWORD packages), then translate the dev set with the paper's
# beam search and print a few translations and the dev BLEU.
# Usage: bash scripts/main.sh [WORKDIR] [--config.FIELD=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/default}"
shift || true
source scripts/setup_env.sh ""
"$PY" train.py --config=configs/default.py --workdir="$WORKDIR" "$@"
DEV="$("$PY" - "$WORKDIR" <<'PYEOF'
import json, sys
from data import bible
config = json.load(open(f"{sys.argv[1]}/config.json"))
print(bible.ensure_default_corpus(config["data"]["data_dir"]) / "dev")
PYEOF
)"
"$PY" decode.py --workdir="$WORKDIR" --checkpoint=latest --input="$DEV.en" \
  --output="$WORKDIR/dev.hyp.es" --reference="$DEV.es" --beam_size=4 --alpha=0.6
echo "== a few dev translations (source / ours / reference)"
paste -d '\n' <(head -n 5 "$DEV.en") <(head -n 5 "$WORKDIR/dev.hyp.es") <(head -n 5 "$DEV.es") \
  | awk '{ printf "%s%s\n", (NR % 3 == 1 ? "\nsrc: " : NR % 3 == 2 ? "hyp: " : "ref: "), $0 }'
