"""benchmarks/gpu_check.py on the CPU: `--device cpu --tiny` runs every check of the GPU path on tiny
fake data (NCCL and AMP aside), and without CUDA a plain run skips in one line."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
FAMILIES = ["CE", "LDAM-DRW", "WB stage 2 (cached features)", "EWB + post-hoc LA",
            "mixup + CutMix + AutoAugment + Cutout", "CE + MORE (merged export)"]
RESUME = ["resume: kill after the epoch-1 checkpoint", "resume: SIGTERM mid-epoch 2"]


def run_script(args, cwd, **env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tiny_cpu_run_passes_every_check_and_prints_the_tables(tmp_path):
    record = tmp_path / "gpu_check.json"
    proc = run_script(["--device", "cpu", "--tiny", "--json", str(record)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(record.read_text())
    assert result["passed"]
    checks = {c["name"]: c for c in result["checks"]}
    for name in FAMILIES:
        assert checks[name]["status"] == "ok", checks[name]
        assert "test top1" in checks[name]["detail"]
    for name in RESUME:
        assert checks[name]["status"] == "identical", checks[name]
    assert checks["MORE merged vs unmerged logits"]["status"] == "ok"
    assert checks["collectives (gloo, world 1)"]["status"] == "ok"
    assert checks["DDP fit (gloo, world 1)"]["status"] == "ok"
    assert "bit for bit" in checks["DDP fit (gloo, world 1)"]["detail"]

    # The speed table has the GPU run's rows; what needs CUDA says so instead of a number.
    speed = {row["row"]: row for row in result["speed"]}
    assert speed["tool/bare train (defaults, float32)"]["ratio"] > 0
    assert speed["gain: data.on_device true vs false"]["gain"] > 0
    for row in ("gain: train.amp float16", "gain: train.amp bfloat16", "gain: train.cudnn_benchmark",
                "gain: train.channels_last (float32)", "tool/bare train (fast set)"):
        assert "needs CUDA" in speed[row]["value"], speed[row]
    assert "skipped on the CPU" in speed["gain: train.compile (on the fast set)"]["value"]
    assert speed["projected 200 epochs, defaults: train + final evaluation"]["seconds"] > 0
    assert "step breakdown" in speed and "dominant cost of the 200-epoch run" in speed
    assert "| check | result | seconds | detail |" in proc.stdout
    assert "| speed (--tiny" in proc.stdout and "11 of 11 checks passed" in proc.stdout


def test_without_cuda_a_plain_run_skips_in_one_line(tmp_path):
    proc = run_script([], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped (no CUDA)")
