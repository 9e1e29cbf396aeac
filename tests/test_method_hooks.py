"""The Method seam's record hooks: `folds` (what finalize folded, in model.yaml) and `diagnostics` (logged
every train.track_every epochs), for built-in and registered methods alike."""
import pytest
import json

import yaml

from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.engine import fit
from longtail.methods import METHODS, register_method, training_folds
from longtail.methods.base import Method
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [*TINY_MLP, "data.batch_size=32", "model.width=16", "train.epochs=1"]


class Doubling(Method):
    """Doubles the head at the end, and says so; logs a diagnostic of its own."""

    @classmethod
    def folds(cls, cfg, method_record):
        return [{"kind": "head_doubled"}]

    def finalize(self, model):
        model.head.weight.data *= 2
        return model

    def diagnostics(self, model, split, device):
        return {"head_norm": float(model.head.weight.detach().norm())}


def test_the_built_in_folds_keep_their_order():
    lws = load_config(None, ["method.name=lws", "method.init_from=x.pt"])
    assert training_folds(lws, {}) == [{"kind": "lws_scales"}]
    tau = load_config(None, ["method.name=tau_norm", "method.init_from=x.pt", "loss.name=ldam", "model.head=cosine"])
    assert training_folds(tau, {"tau_norm": {"tau": 0.5}}) == [
        {"kind": "tau_norm", "tau": 0.5}, {"kind": "logit_scale", "scale": 30.0}]
    more_lora = load_config(None, ["more.enabled=true", "finetune.mode=lora", "finetune.lora_rank=4",
                                   "finetune.lora_alpha=8", "model.name=hf_vit"])
    assert training_folds(more_lora, {}) == [{"kind": "more_merge"}, {"kind": "lora_merge", "rank": 4, "scale": 2.0}]


def test_a_registered_method_records_its_folds_and_logs_its_diagnostics(tmp_path, data_root):
    register_method("doubling_test_only", f"{__name__}:Doubling")
    try:
        cfg = load_config(None, [*TINY, "method.name=doubling_test_only", "train.track_every=1"])
        fit(cfg, tmp_path / "run", data_root=data_root)
    finally:
        del METHODS["doubling_test_only"]
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["folds"] == [{"kind": "head_doubled"}]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["head_norm"] > 0 and "track" in record


class NeedsSgd(Method):
    """A method with a config rule of its own (`Method.check_config`)."""

    @classmethod
    def check_config(cls, cfg):
        if cfg.optim.name != "sgd":
            raise ConfigError(f"optim.name: needs_sgd_test_only trains with sgd, got {cfg.optim.name}")


def test_a_methods_own_config_rule_refuses_before_anything_is_written(tmp_path, data_root, capsys):
    from longtail.cli import main
    from longtail.sweep import plan

    register_method("needs_sgd_test_only", f"{__name__}:NeedsSgd")
    try:
        bad = [*TINY, "method.name=needs_sgd_test_only", "optim.name=adamw"]
        with pytest.raises(ConfigError, match="optim.name: needs_sgd_test_only trains with sgd, got adamw"):
            fit(load_config(None, bad), tmp_path / "run", data_root=data_root)
        config = tmp_path / "tiny.yaml"
        config.write_text("")
        assert main(["train", str(config), "--out", str(tmp_path / "cli"), "--quiet", *bad]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "longtail train: error: optim.name: needs_sgd_test_only trains with sgd, got adamw"]
        with pytest.raises(ConfigError, match="needs_sgd_test_only trains with sgd"):  # before any point runs
            plan(str(config), [*TINY, "method.name=needs_sgd_test_only"], [("optim.name", ["sgd", "adamw"])], None,
                 tmp_path / "sweep")
        fit(load_config(None, [*TINY, "method.name=needs_sgd_test_only"]), tmp_path / "good", data_root=data_root)
    finally:
        del METHODS["needs_sgd_test_only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "tiny.yaml"]  # the refused ones wrote nothing
