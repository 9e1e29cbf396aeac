#!/usr/bin/env bash
# Install, then a short CIFAR-10-LT (IF 100) training + evaluation that prints the results table.
# Data comes from $LONGTAIL_DATA (or --data-root via LONGTAIL_DATA), else it is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
LONGTAIL=.venv/bin/longtail; [ -n "${VIRTUAL_ENV:-}" ] && LONGTAIL=longtail
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
exec "$LONGTAIL" train configs/cifar10_lt/quickstart.yaml --out "$out" --download "$@"
