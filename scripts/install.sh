#!/usr/bin/env bash
# Set up longtail: a virtual environment in .venv (unless one is active), the CPU torch wheel when no
# torch is importable, then the package itself with its test and hf extras (transformers: a few tens of MB of
# wheels, no torch change), so the suite's Hugging Face tests run too; the test extra brings the mlflow and wandb
# trackers' packages (mlflow-skinny, not the whole MLflow server). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
    PY=.venv/bin/python
else
    PY=python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    # Pinned: an unpinned torch pulls a multi-GB CUDA build. LONGTAIL_TORCH_INDEX may name a wheel index
    # (e.g. PyTorch's CPU index) on machines whose default index has no CPU build of this version.
    "$PY" -m pip install -q ${LONGTAIL_TORCH_INDEX:+--index-url "$LONGTAIL_TORCH_INDEX"} "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,hf]"
echo "installed longtail into $("$PY" -c 'import sys; print(sys.prefix)')"
