#!/usr/bin/env bash
# Set up (CPU requirements, pinned torch) and run the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
exec python3 -m pytest -q "$@"
