#!/usr/bin/env bash
# The trained models that benchmarks/bench_decoding.py uses (step budgets, so they do not depend on
# the machine's speed): the shakespeare-char recipe as the target (2,000 steps), two small drafts
# on the same text and tokenizer (1 x 64, 1,500 steps; 2 x 128, 2,000 steps), and a larger target
# (6 x 384, 800 steps). About 25 minutes on 2 CPU threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for name in draft:draft-char draft2:draft2-char target:target-char target6:target6-char; do
  "$PY" -m attnkit train --config "benchmarks/decoding_models/${name%%:*}.yaml" --out "runs/${name##*:}" --threads 2
done
