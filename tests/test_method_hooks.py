"""The Method seam's record hooks: `folds` (what finalize folded, in model.yaml) and `diagnostics` (logged
every train.track_every epochs), for built-in and registered methods alike."""
import pytest
import json

import yaml

from longtail.config import load_config
from longtail.engine import fit
from longtail.methods import METHODS, register_method, training_folds
from longtail.methods.base import Method

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = ["data.name=fashion_mnist_lt", "data.imbalance=5", "data.batch_size=32", "model.name=mlp", "model.width=16",
        "train.epochs=1", "eval.batch_size=64"]


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
