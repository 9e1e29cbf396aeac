"""LDAM's exported model gives the logits its loss saw: the trained head at the loss's scale.

The LDAM loss multiplies the head's outputs by `loss.ldam_scale` (30) before its softmax; the model
trains with a scale-1 cosine head. The engine folds that scale into the exported head, so `model.pt`'s
logits, ECE and NLL are those of the trained softmax, and `longtail eval` reproduces them.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from longtail.checkpoint import load_checkpoint
from longtail.config import load_config
from longtail.engine import collect_logits, fit, load_run
from longtail.metrics import expected_calibration_error
from longtail.models import build_model
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

LDAM = [*TINY_MLP, "train.epochs=3", "loss.name=ldam", "loss.drw_start=0.6"]


def _trained_and_exported(out, data_root):
    """Test logits of the trained model as it trained (checkpoint.pt, the config's head) and of model.pt."""
    run = load_run(out, data_root=str(data_root))
    trained = build_model(run.cfg.model, run.data.num_classes, run.data.in_channels, run.data.image_size)
    trained.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])  # the final epoch, before export
    device = torch.device("cpu")
    z_trained, y = collect_logits(trained, run.data.test, device)
    z_exported, y2 = collect_logits(run.model, run.data.test, device)
    assert torch.equal(y, y2)
    return run, trained, z_trained, z_exported, y


@pytest.mark.parametrize("scale", [30.0, 10.0])
def test_exported_cosine_head_is_at_the_losss_scale_and_eval_reproduces_it(tmp_path, data_root, scale):
    out = tmp_path / "run"
    results = fit(load_config(None, [*LDAM, "model.head=cosine", f"loss.ldam_scale={scale}"]), out,
                  data_root=str(data_root))
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["model"]["head"] == "cosine" and spec["model"]["head_scale"] == scale
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["head_scale"] == 1.0  # trained at scale 1

    run, trained, z_trained, z_exported, y = _trained_and_exported(out, data_root)
    assert run.model.head.scale == scale and trained.head.scale == 1.0
    assert z_trained.abs().max() <= 1.0 + 1e-5  # cosines
    assert torch.allclose(z_exported, scale * z_trained, rtol=1e-5, atol=1e-5)
    assert torch.equal(z_exported.argmax(1), z_trained.argmax(1))  # accuracy does not change

    # The recorded ECE / NLL are those of the scaled logits, not of the (nearly flat) cosine softmax.
    assert results["ece"] == pytest.approx(expected_calibration_error(z_exported.double(), y, 15), abs=1e-6)
    nll = F.cross_entropy(z_exported.double(), y).item()
    assert results["nll"] == pytest.approx(nll, rel=1e-5)
    assert results["nll"] != pytest.approx(F.cross_entropy(z_trained.double(), y).item(), rel=1e-2)
    flat = F.softmax(z_trained, 1).max(1).values
    sharp = F.softmax(z_exported, 1).max(1).values
    assert flat.max() < 0.5  # 10 cosines in [-1, 1]: the largest probability is at most e / (e + 9 / e) = 0.45
    assert sharp.mean() > flat.mean() + 0.2

    env = {**os.environ, "LONGTAIL_DATA": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "longtail", "eval", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "eval-test.json").read_text())
    # Another process (its own thread pool, so its own reduction order) scoring the same model.pt: equal at float32
    # tolerance, not bit for bit.
    for key in ("top1", "balanced", "many", "medium", "few", "ece", "nll"):
        expected = None if results[key] is None else pytest.approx(results[key], rel=1e-5, abs=1e-5)
        assert again[key] == expected, key
    assert again["per_class"] == results["per_class"]


def test_exported_linear_head_carries_the_scale_in_its_weight_and_bias(tmp_path, data_root):
    # LDAM on a linear head is allowed (the loss is CE on 30 (z - m_y e_y) whatever z is); the exported head
    # is the same linear layer with weight and bias x30, so it keeps head_scale 1 in model.yaml. (The loss's x30
    # acts on unnormalised logits here: a lower lr keeps the tiny run tame.)
    out = tmp_path / "run"
    results = fit(load_config(None, [*LDAM, "model.head=linear", "optim.lr=0.005"]), out, data_root=str(data_root))
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["model"]["head"] == "linear" and spec["model"]["head_scale"] == 1.0 and spec["model"]["head_bias"]

    run, trained, z_trained, z_exported, y = _trained_and_exported(out, data_root)
    assert torch.allclose(run.model.head.weight, 30.0 * trained.head.weight, rtol=1e-6, atol=1e-7)
    assert torch.allclose(run.model.head.bias, 30.0 * trained.head.bias, rtol=1e-6, atol=1e-7)
    assert torch.allclose(z_exported, 30.0 * z_trained, rtol=1e-4, atol=1e-4)
    assert results["ece"] == pytest.approx(expected_calibration_error(z_exported.double(), y, 15), abs=1e-6)


def test_losses_without_a_scale_export_the_trained_head_unchanged(tmp_path, data_root):
    out = tmp_path / "run"
    fit(load_config(None, [*LDAM, "loss.name=ce", "loss.drw_start=null", "model.head=cosine"]), out,
        data_root=str(data_root))
    assert yaml.safe_load((out / "model.yaml").read_text())["model"]["head_scale"] == 1.0
    _, _, z_trained, z_exported, _ = _trained_and_exported(out, data_root)
    assert torch.equal(z_exported, z_trained)
