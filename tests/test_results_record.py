"""results.json records the imbalance actually trained on and where the Many/Medium/Few thresholds came from."""
import pytest
import json

from fake_data import write_fashion_mnist
from longtail.config import load_config
from longtail.engine import fit

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [
    "data.name=fashion_mnist_lt", "data.batch_size=16", "data.augment=none", "model.name=mlp", "model.width=16",
    "train.epochs=1", "eval.batch_size=256",
]


def _results(tmp_path, name, overrides):
    fit(load_config(None, [*TINY, *overrides]), tmp_path / name, data_root=str(tmp_path / "data"))
    return json.loads((tmp_path / name / "results.json").read_text())


def test_results_record_measured_imbalance_and_thresholds_rule(tmp_path):
    write_fashion_mnist(tmp_path / "data", train_per_class=12, test_per_class=2)
    natural = _results(tmp_path, "natural", ["data.profile=none"])
    assert natural["imbalance"] == 1.0  # balanced natural counts, not data.imbalance's 100
    assert natural["thresholds_rule"] == "10-class protocol (> 1000 / < 200): fashion_mnist_lt"
    given = _results(tmp_path, "exp", ["data.imbalance=4", "eval.thresholds=[10,5]"])
    assert given["imbalance"] == 4.0 and given["thresholds"] == [10, 5]
    assert given["thresholds_rule"] == "eval.thresholds from the config"


def test_results_record_the_commit_torch_version_and_device(tmp_path):
    import re
    import subprocess

    import torch

    write_fashion_mnist(tmp_path / "data", train_per_class=12, test_per_class=2)
    env = _results(tmp_path, "run", ["train.device=cpu", "data.imbalance=4"])["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=__import__("longtail").__path__[0])
    if head.returncode == 0:  # a checkout: its commit, +dirty with uncommitted changes
        assert re.fullmatch(head.stdout.strip() + r"(\+dirty)?", env["commit"])
    else:
        assert env["commit"] is None
