#!/usr/bin/env bash
# Install attnkit with its test dependencies and run the test suite. pytest's exit code is
# passed through, so "no tests collected" (5) fails like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
PY=${PYTHON:-python3}
exec "$PY" -m pytest -p no:cacheprovider tests "$@"
