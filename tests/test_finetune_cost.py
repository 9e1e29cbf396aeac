"""benchmarks/finetune_cost.py --tiny: every mode's step time and peak memory, side by side, from one run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
MODES = ["full", "linear", "bias", "lora", "adaptformer", "lora+more", "lora+more, grad checkpoint"]


def test_tiny_run_prints_every_mode_as_ratios_to_full(tmp_path):
    record = tmp_path / "cost.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "finetune_cost.py"), "--tiny", "--device", "cpu",
                           "--steps", "2", "--json", str(record)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:28].strip(): line[28:].split() for line in proc.stdout.splitlines() if line[:28].strip() in MODES}
    assert list(rows) == MODES and rows["full"] == ["100.00%", "1.00x", "1.00x", "1.00x"]
    assert "grad checkpoint on / off for lora+more: step time" in proc.stdout
    result = json.loads(record.read_text())["cpu"]
    assert list(result) == MODES
    full = result["full"]
    assert all(r["step_s"] > 0 and r["peak_mb"] >= r["before_mb"] > 0 for r in result.values())
    assert result["linear"]["total"] == result["bias"]["total"] == full["total"] < result["lora"]["total"]
    assert result["linear"]["trainable"] < result["bias"]["trainable"] < result["lora"]["trainable"] < full["total"]
    assert full["trainable"] == full["total"]
