#!/usr/bin/env bash
# Sets up and runs the whole test suite, the slow (real-model) tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -m "slow or not slow" "$@"
