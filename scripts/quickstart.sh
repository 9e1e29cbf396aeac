#!/usr/bin/env bash
# Install, then the point of the project in one short comparison on CIFAR-10-LT (IF 100): plain cross-entropy
# against a re-balancing loss (logit-adjusted, tau 1) at the same budget, then the results table of both and
# a figure of their per-class accuracy against class size. Data comes from $LONGTAIL_DATA, else it is
# downloaded. Extra arguments go to both `longtail train` runs (e.g. train.epochs=1, --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
LONGTAIL=.venv/bin/longtail; [ -n "${VIRTUAL_ENV:-}" ] && LONGTAIL=longtail
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
"$LONGTAIL" train configs/cifar10_lt/quickstart.yaml --out "$out/ce" --download "$@"
"$LONGTAIL" train configs/cifar10_lt/quickstart.yaml loss.name=la --out "$out/la" --download "$@"
"$LONGTAIL" report "$out/ce" "$out/la" --plot "$out/per_class.png"
