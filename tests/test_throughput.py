"""benchmarks/throughput.py --compare --tiny: every precision setting at every thread count, as ratios to fp32,
with the CPU, its bfloat16 capability, the recipe's projected wall time and a profile; structure, not timings."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_data import write_cifar10
from longtail.provenance import cpu_model, native_bf16

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["fp32", "bf16", "bf16+cl", "bf16+cl+compile", "fp32+compile"]
PHASES = ["data", "augmentation", "forward", "backward", "optimiser", "evaluation"]


def test_tiny_compare_measures_every_setting_at_both_thread_counts(tmp_path):
    write_cifar10(tmp_path / "data", train_per_class=40, test_per_class=4)
    record = tmp_path / "compare.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--compare", "--tiny", "--profile",
                           "--data-root", str(tmp_path / "data"), "--json", str(record), "data.imbalance=10"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"CPU: {cpu_model()}; native bfloat16: {native_bf16() or 'none (bfloat16 is emulated)'}" in proc.stdout
    assert "recipe: 200 epochs x 159 training images + 200 evaluations x 40 test images" in proc.stdout
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [(r[0], r[1]) for r in rows] == [(f"| {t}", s) for t in (1, 2) for s in SETTINGS]
    assert all(r[3] == "x1.00" for r in rows if r[1] == "fp32")
    assert all(float(r[3].lstrip("x")) > 0 for r in rows)

    result = json.loads(record.read_text())
    assert result["cpu"] == cpu_model() and result["native_bf16"] == native_bf16()
    assert result["recipe"] == {"epochs": 200, "train_images": 159, "evaluations": 200, "test_images": 40}
    assert list(result["threads"]) == ["1", "2"]
    for table in result["threads"].values():
        assert list(table) == SETTINGS and table["fp32"]["ratio_to_fp32"] == 1.0
        for row in table.values():
            assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["ratio_to_fp32"] > 0
            # the projection is the recipe's images at the measured rates
            expected = 200 * 159 / row["train_img_s"] + 200 * 40 / row["eval_img_s"]
            assert row["recipe_s"] == pytest.approx(expected)
    assert list(result["profile"]) == SETTINGS
    assert all(list(p) == PHASES and min(p.values()) >= 0 and p["forward"] > 0 for p in result["profile"].values())


def test_settings_without_the_fp32_baseline_are_refused():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    with pytest.raises(SystemExit, match="--settings bf16,bf16\\+cl: name fp32"):
        throughput.main(["--compare", "--tiny", "--settings", "bf16,bf16+cl"])
    with pytest.raises(SystemExit, match="any of fp32, bf16, bf16\\+cl"):
        throughput.main(["--compare", "--tiny", "--settings", "fp32,fp16"])
