"""`method.init_from` for every method: a one-stage run (erm, MORE, LoRA) starts from an earlier run's
model.pt, its architecture and training subset checked; MORE as a second stage on a trained model."""
from __future__ import annotations

import pytest
import torch

from longtail.checkpoint import load_checkpoint
from longtail.config import load_config
from longtail.engine import fit, setup
from longtail.errors import ConfigError
from longtail.lowrank import lowrank_parts
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains runs

RUN = [*TINY_MLP, "train.epochs=1", "schedule.warmup_epochs=0"]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("earlier") / "ce"
    fit(load_config(None, RUN), out, data_root=data_root)
    return out


def test_erm_starts_from_the_earlier_runs_model(earlier, data_root):
    run = setup(load_config(None, [*RUN, f"method.init_from={earlier}"]), data_root=data_root)
    exported = load_checkpoint(earlier / "model.pt")
    state = run.model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in exported)
    fresh = setup(load_config(None, RUN), data_root=data_root).model.state_dict()
    assert not torch.equal(fresh["head.weight"], exported["head.weight"])


def test_more_and_lora_decompose_the_loaded_weights(earlier, data_root):
    exported = load_checkpoint(earlier / "model.pt")
    for extra in (["more.enabled=true", "more.general_lr_scale=0"], ["finetune.mode=lora", "more.enabled=true"]):
        run = setup(load_config(None, [*RUN, f"method.init_from={earlier}", *extra]), data_root=data_root)
        w_g = run.model.body[0].parametrizations.weight.original
        assert torch.equal(w_g, exported["body.0.weight"]) and not w_g.requires_grad
        assert len(lowrank_parts(run.model)) >= 3


@pytest.mark.parametrize("override, message", [
    ("model.width=16", r"method.init_from: .*model.pt does not fit this config's model \(mlp, head linear\)"),
    ("data.imbalance=10", r"method.init_from: the run it starts from .* different subset \(data.imbalance: 5.0 there, "
                          r"10.0 here\); use that run's data settings"),
])
def test_a_mismatch_is_a_one_line_error_before_training(earlier, data_root, tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as err:
        fit(load_config(None, [*RUN, f"method.init_from={earlier}", override]), out, data_root=data_root)
    assert "\n" not in str(err.value) and not (out / "checkpoint.pt").exists()


def test_a_missing_run_is_named(data_root, tmp_path):
    with pytest.raises(ConfigError, match=r"method.init_from: .*missing does not exist; give a finished run.s directory or its model.pt"):
        setup(load_config(None, [*RUN, f"method.init_from={tmp_path / 'missing'}"]), data_root=data_root)


def test_lora_plus_more_as_a_second_stage_trains_and_exports_a_plain_model(earlier, data_root, tmp_path):
    out = tmp_path / "lora_more"
    results = fit(load_config(None, [*RUN, f"method.init_from={earlier}", "finetune.mode=lora", "more.enabled=true"]),
                  out, data_root=data_root)
    assert results["method"] == "erm+more"
    exported, before = load_checkpoint(out / "model.pt"), load_checkpoint(earlier / "model.pt")
    assert list(exported) == list(before)
    assert not torch.equal(exported["body.0.weight"], before["body.0.weight"])  # the merged LoRA part
    assert torch.equal(exported["body.1.weight"], before["body.1.weight"])  # BN frozen under lora
