#!/usr/bin/env bash
# Install attnkit (and, with "test", its test dependencies) into the current Python.
# torch comes first and pinned: on CPU the 2.13.0 wheel is on local disk, while an unpinned
# torch would pull a multi-GB CUDA build. A torch that is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
