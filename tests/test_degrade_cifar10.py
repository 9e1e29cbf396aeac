"""scripts/degrade_cifar10.py: the dose-response copy keeps labels and order, changes pixels, never overwrites."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from fake_data import write_cifar10
from longtail.data.cifar import read_cifar10

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "degrade_cifar10.py"


def degrade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_copy_keeps_labels_and_order_and_changes_pixels(tmp_path):
    write_cifar10(tmp_path / "src", train_per_class=3, test_per_class=2)
    done = degrade(str(tmp_path / "src"), str(tmp_path / "dst"), "--quality", "30")
    assert done.returncode == 0, done.stderr
    assert "mean absolute change" in done.stdout
    before, after = read_cifar10(tmp_path / "src"), read_cifar10(tmp_path / "dst")
    assert np.array_equal(before.train_labels, after.train_labels)
    assert np.array_equal(before.test_labels, after.test_labels)
    assert before.class_names == after.class_names
    assert after.train_images.shape == before.train_images.shape
    change = np.abs(after.train_images.astype(int) - before.train_images).mean()
    assert 0 < change < 128
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["cifar-10-batches-py"]  # no staging left


def test_refuses_an_existing_copy_and_bad_settings(tmp_path):
    write_cifar10(tmp_path / "src", train_per_class=2, test_per_class=1)
    assert degrade(str(tmp_path / "src"), str(tmp_path / "dst")).returncode == 0
    written = (tmp_path / "dst" / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    again = degrade(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert again.returncode == 2 and "exists already" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "dst" / "cifar-10-batches-py" / "data_batch_1").read_bytes() == written
    bad = degrade(str(tmp_path / "nothing"), str(tmp_path / "other"), "--quality", "0")
    assert bad.returncode == 2
    assert "does not hold the CIFAR-10 batches" in bad.stderr and "--quality must lie in 1..95" in bad.stderr
    assert not (tmp_path / "other").exists()
