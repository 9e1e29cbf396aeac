"""EWB one-stage recipe: the loss, the fixed ETF head, and its configs' protocol."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fake_data import write_fashion_mnist
from longtail.checkpoint import load_checkpoint
from longtail.config import load_config
from longtail.engine import build_optimizer, fit
from longtail.errors import ConfigError
from longtail.methods.base import RunInfo
from longtail.methods.ewb import EWB
from longtail.models import build_model
from longtail.models.heads import simplex_etf
from tiny import TINY_MLP

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _method(*overrides):
    cfg = load_config(None, ["method.name=ewb", "model.head=etf", "model.name=mlp", "model.width=16", *overrides])
    info = RunInfo(cfg=cfg, num_classes=4, class_counts=[8, 4, 2, 1], epochs=1, steps_per_epoch=1,
                   device=torch.device("cpu"))
    return cfg, EWB(cfg, info, lambda logits, y, progress: F.cross_entropy(logits, y))


def test_loss_is_ce_plus_half_lambda_times_mean_squared_feature_norm():
    _, method = _method("method.feature_reg=0.1")
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # squared norms 25 and 1, mean 13
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    loss, logs = method.criterion(features, logits, y, 0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item() + 0.1 / 2 * 13)
    assert logs["feature_reg"].item() == pytest.approx(0.65)
    assert logs["feature_norm"].item() == pytest.approx(3.0)  # (5 + 1) / 2


def test_ewb_needs_the_etf_head_and_never_trains_it():
    cfg, method = _method()
    model = method.prepare(build_model(cfg.model, 4, 1, 8))
    optimizer = build_optimizer(cfg, method.param_groups(model))
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.head.bias) in trained
    assert "head.weight" not in dict(model.named_parameters()) and "head.weight" in model.state_dict()

    cfg_linear = load_config(None, ["method.name=ewb", "model.name=mlp", "model.width=16"])
    with pytest.raises(ConfigError, match="model.head: etf"):
        method.prepare(build_model(cfg_linear.model, 4, 1, 8))


def test_etf_needs_enough_feature_dimensions():
    cfg = load_config(None, ["model.name=resnet32", "model.head=etf"])
    with pytest.raises(ConfigError, match="resnet34_cifar"):
        build_model(cfg.model, 100, 3, 32)


def test_ewb_trains_end_to_end_and_logs_the_feature_term(tmp_path):
    write_fashion_mnist(tmp_path / "data", train_per_class=30, test_per_class=5)
    overrides = [*TINY_MLP, "model.head=etf", "method.name=ewb", "optim.weight_decay=0.005", "train.epochs=1",
                 "eval.batch_size=256"]
    fit(load_config(None, overrides), tmp_path / "run", data_root=str(tmp_path / "data"))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["feature_reg"] > 0 and record["feature_norm"] > 0
    state = load_checkpoint(tmp_path / "run" / "model.pt")
    assert torch.equal(state["head.weight"], simplex_etf(32, 10, 0))


@pytest.mark.parametrize("dataset", ["cifar10_lt", "cifar100_lt", "fashion_mnist_lt"])
def test_ewb_configs_follow_the_reference_protocol(dataset):
    paths = sorted((CONFIGS / dataset).glob("ewb*.yaml"))
    assert paths, f"no EWB configs for {dataset}"
    for path in paths:
        cfg = load_config(path)
        text = path.read_text()
        assert text.startswith("#") and "protocol" in text.lower(), f"{path} must state its protocol"
        assert cfg.method.name == "ewb" and cfg.model.head == "etf" and cfg.loss.name == "ce"
        assert cfg.optim.weight_decay == 5e-3 and cfg.method.feature_reg == 1e-2
        assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 64 and cfg.schedule.name == "cosine"
        assert cfg.train.epochs == 320 and cfg.eval.select == "best_val" and cfg.data.val_per_class == 20
        assert cfg.posthoc.kind == "multiplicative" and cfg.posthoc.tau is None
        if dataset.startswith("cifar"):
            assert cfg.data.selection == "first"
        if dataset == "cifar10_lt":
            assert cfg.data.std == [0.2470, 0.2435, 0.2616]
        build_model(cfg.model, 100 if dataset == "cifar100_lt" else 10, 1 if dataset == "fashion_mnist_lt" else 3,
                    28 if dataset == "fashion_mnist_lt" else 32)
