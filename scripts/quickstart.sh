#!/usr/bin/env bash
# The main job on the built-in default: install, train a character-level GPT on Shakespeare
# for a bounded time on the CPU, then print a sample from the best checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
# the recipe trains for 570 s; MAX_TIME=<seconds> changes the budget
"$PY" -m attnkit train --recipe shakespeare-char --out runs/shakespeare-char ${MAX_TIME:+--max-time "$MAX_TIME"}
"$PY" -m attnkit generate --ckpt runs/shakespeare-char/best -p "ROMEO:" --max-new-tokens 500 --seed 1
