#!/usr/bin/env bash
# Install attnkit with its test dependencies (and the Debian packages some tests need, when
# missing: scripts/system_packages.sh) and run the test suite. pytest's exit code is passed
# through, so "no tests collected" (5) fails like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system_packages.sh
bash scripts/install.sh test
PY=${PYTHON:-python3}
exec "$PY" -m pytest -p no:cacheprovider tests "$@"
