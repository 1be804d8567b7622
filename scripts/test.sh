#!/usr/bin/env bash
# Set up (CPU requirements with torch pinned, plus the test extras: triton for its CPU
# interpreter) and run the whole test suite. docs/testing.md says how to run parts of it.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt
exec python3 -m pytest -q "$@"
