#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Real-data tests run when $LONGTAIL_DATA holds the data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python; [ -n "${VIRTUAL_ENV:-}" ] && PY=python
exec "$PY" -m pytest "$@"
