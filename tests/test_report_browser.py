"""`report --html` in a real headless browser (Debian's `chromium`): the page renders, the browser's
DOM holds the tables and one dot per class. Skipped where no Chromium is installed (CI needs none)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from longtail.config import load_config
from longtail.report_html import report_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium); "
                                "the HTML itself is checked by test_report.py with html.parser")]


def _runs(tmp_path):
    runs = []
    for name, loss, top1s in (("loss.name=ce", "ce", [70.0, 72.0]), ("loss.name=la", "la", [74.0, 75.5])):
        for seed, top1 in enumerate(top1s):
            cfg = load_config(None, [f"loss.name={loss}", f"train.seed={seed}"])
            out = tmp_path / f"{name},seed={seed}"
            out.mkdir()
            counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
            per_class = [top1 + 25 - 5 * k for k in range(10)]
            out.joinpath("results.json").write_text(json.dumps({
                "top1": top1, "many": top1 + 15, "medium": top1, "few": top1 - 20, "ece": 10.0, "seed": seed,
                "dataset": "cifar10_lt", "imbalance": 100, "model": "resnet32", "method": "erm", "loss": loss,
                "epochs": 200, "checkpoint": "final", "posthoc": None, "config": cfg.to_dict(),
                "class_counts": counts, "per_class": per_class, "thresholds": [1000, 200],
                "environment": {"commit": "f5ba1c9", "torch": "2.13.0", "device": "cpu"}, "world_size": 1}))
            runs.append(str(out))
    return runs


def _chromium(*args):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_page_renders_in_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report_html(_runs(tmp_path), baseline="loss.name=ce"))
    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") == 2 and dom.stdout.count("<circle") == 20  # 10 classes x 2 rows
    # Differences 4 and 3.5: mean 3.75, standard error 0.25, t = 15 on 1 df; 12.706 x 0.25 = 3.18 either side.
    assert "+3.75 [+0.57, +6.93] p=0.0424" in dom.stdout  # as the browser parsed the page
    shot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,1000", page.as_uri())
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
