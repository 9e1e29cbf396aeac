"""Decoupled classifiers on a frozen stage-1 backbone: cRT, LWS, tau-normalisation."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fake_data import write_fashion_mnist
from longtail.checkpoint import atomic_torch_save, load_checkpoint
from longtail.config import load_config
from longtail.data.splits import InMemorySplit
from longtail.engine import fit
from longtail.errors import ConfigError
from longtail.methods.base import RunInfo
from longtail.methods.decoupled import CRT, LWS, TauNorm, tau_normalized
from longtail.methods.posthoc import tau_grid
from longtail.models import build_model
from longtail.models.heads import LinearHead
from tiny import TINY_MLP

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODEL = ["model.name=mlp", "model.width=16"]


@pytest.fixture
def stage1_pt(tmp_path):
    """An (untrained) stage-1 model saved as a bare model.pt, with distinct head row norms."""
    torch.manual_seed(0)
    model = build_model(load_config(None, MODEL).model, 4, 1, 8)
    with torch.no_grad():
        model.head.weight.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None])
    atomic_torch_save(model.state_dict(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _method(cls, stage1_pt, *overrides, data=None):
    cfg = load_config(None, [*MODEL, f"method.init_from={stage1_pt}", *overrides])
    info = RunInfo(cfg=cfg, num_classes=4, class_counts=[40, 20, 10, 5], epochs=1, steps_per_epoch=1,
                   device=torch.device("cpu"), data=data)
    return cfg, cls(cfg, info, base_loss=None)


def test_tau_normalisation_of_rows():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    assert torch.allclose(tau_normalized(w, 1.0).norm(dim=1), torch.ones(2))
    assert torch.equal(tau_normalized(w, 0.0), w)
    assert torch.allclose(tau_normalized(w, 0.5).norm(dim=1), torch.tensor([5.0**0.5, 0.5**0.5]))


def test_crt_reinitialises_the_head_and_keeps_the_backbone(stage1_pt):
    cfg, method = _method(CRT, stage1_pt, "method.name=crt")
    stage1 = load_checkpoint(stage1_pt)
    model = method.prepare(build_model(cfg.model, 4, 1, 8))
    state = model.state_dict()
    assert all(torch.equal(stage1[k], state[k]) for k in stage1 if not k.startswith("head."))
    assert not torch.equal(stage1["head.weight"], state["head.weight"])
    again = _method(CRT, stage1_pt, "method.name=crt")[1].prepare(build_model(cfg.model, 4, 1, 8))
    assert torch.equal(again.head.weight, model.head.weight)  # seeded by train.seed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_lws_trains_only_scales_and_folds_them_into_a_linear_head(stage1_pt):
    cfg, method = _method(LWS, stage1_pt, "method.name=lws")
    model = method.prepare(build_model(cfg.model, 4, 1, 8))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.scale"}
    with torch.no_grad():
        model.head.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    model.eval()
    x = torch.randn(6, 1, 8, 8)
    expected = model(x)
    model = method.finalize(model)
    assert type(model.head) is LinearHead
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert set(model.state_dict()) == set(load_checkpoint(stage1_pt))


def test_tau_norm_with_a_given_tau(stage1_pt):
    cfg, method = _method(TauNorm, stage1_pt, "method.name=tau_norm", "method.tau_norm_tau=1.0")
    model = method.prepare(build_model(cfg.model, 4, 1, 8))
    assert method.param_groups(model) == [] and not any(p.requires_grad for p in model.parameters())
    bias = model.head.bias.detach().clone()
    model = method.finalize(model)
    assert torch.allclose(model.head.weight.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(model.head.bias, bias)  # the bias is kept, as in WB's reference code
    assert method.info.extra["tau_norm"] == {"tau": 1.0, "searched": False}


def test_tau_norm_searches_tau_on_validation(stage1_pt):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20) % 4
    val = InMemorySplit(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=g), labels,
                        torch.arange(20), [0.5], [0.25], "none", 4)
    cfg, method = _method(TauNorm, stage1_pt, "method.name=tau_norm", "method.tau_norm_tau=null",
                          data=SimpleNamespace(val=val))
    model = method.finalize(method.prepare(build_model(cfg.model, 4, 1, 8)))
    record = method.info.extra["tau_norm"]
    assert record["searched"] and record["tau"] in tau_grid(cfg.posthoc.grid)
    assert len(record["curve"]) == 41 and max(p[1] for p in record["curve"]) == dict(record["curve"])[record["tau"]]
    norms = model.head.weight.norm(dim=1)
    original = load_checkpoint(stage1_pt)["head.weight"].norm(dim=1)
    assert torch.allclose(norms, original.pow(1 - record["tau"]), rtol=1e-5)

    _, no_val = _method(TauNorm, stage1_pt, "method.name=tau_norm", "method.tau_norm_tau=null",
                        data=SimpleNamespace(val=None))
    with pytest.raises(ConfigError, match="method.tau_norm_tau"):
        no_val.finalize(no_val.prepare(build_model(cfg.model, 4, 1, 8)))


def test_decoupled_heads_refuse_a_cosine_head(tmp_path):
    cosine = build_model(load_config(None, [*MODEL, "model.head=cosine"]).model, 4, 1, 8)
    atomic_torch_save(cosine.state_dict(), tmp_path / "cosine.pt")
    for cls, name in ((LWS, "lws"), (TauNorm, "tau_norm")):
        cfg, method = _method(cls, tmp_path / "cosine.pt", f"method.name={name}", "model.head=cosine")
        with pytest.raises(ConfigError, match=f"{name}.*CosineHead"):
            method.prepare(build_model(cfg.model, 4, 1, 8))


def test_lws_end_to_end_exports_a_plain_linear_model(tmp_path):
    write_fashion_mnist(tmp_path / "data", train_per_class=30, test_per_class=5)
    base = [*TINY_MLP, "eval.batch_size=256"]
    model = build_model(load_config(None, base).model, 10, 1, 28)
    atomic_torch_save(model.state_dict(), tmp_path / "stage1.pt")
    overrides = [*base, "method.name=lws", f"method.init_from={tmp_path / 'stage1.pt'}", "data.sampler=class_balanced",
                 "method.cache_features=true", "train.epochs=1", "optim.lr=0.1"]
    fit(load_config(None, overrides), tmp_path / "run", data_root=str(tmp_path / "data"))
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["model"]["head"] == "linear"
    state = load_checkpoint(tmp_path / "run" / "model.pt")
    assert set(state) == set(model.state_dict())
    stage1 = model.state_dict()
    assert all(torch.equal(stage1[k], state[k]) for k in stage1 if not k.startswith("head."))
    scales = state["head.weight"].norm(dim=1) / stage1["head.weight"].norm(dim=1)
    assert not torch.allclose(scales, torch.ones(10))


def test_tau_norm_end_to_end_trains_nothing_and_records_its_tau(tmp_path):
    write_fashion_mnist(tmp_path / "data", train_per_class=30, test_per_class=5)
    base = TINY_MLP
    model = build_model(load_config(None, base).model, 10, 1, 28)
    atomic_torch_save(model.state_dict(), tmp_path / "stage1.pt")
    overrides = [*base, "method.name=tau_norm", f"method.init_from={tmp_path / 'stage1.pt'}", "method.tau_norm_tau=null",
                 "data.val_per_class=3"]
    results = fit(load_config(None, overrides), tmp_path / "run", data_root=str(tmp_path / "data"))
    assert results["epoch"] == 0 and not (tmp_path / "run" / "checkpoint.pt").exists()
    record = results["method_record"]["tau_norm"]
    assert record["tau"] in [tau for tau, _ in record["curve"]]
    state = load_checkpoint(tmp_path / "run" / "model.pt")
    expected = tau_normalized(model.state_dict()["head.weight"], record["tau"])
    assert torch.allclose(state["head.weight"], expected)

    with pytest.raises(ConfigError, match="eval.select: best_val picks an epoch, but method tau_norm trains nothing"):
        fit(load_config(None, [*overrides, "eval.select=best_val"]), tmp_path / "run2", data_root=str(tmp_path / "data"))

    # A second run into the same --out is refused, not written over the first; --resume reports it.
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(load_config(None, overrides), tmp_path / "run", data_root=str(tmp_path / "data"))
    fit(load_config(None, overrides), tmp_path / "run", resume=True, data_root=str(tmp_path / "data"))
    assert (tmp_path / "run" / "results.json").read_bytes() == before


@pytest.mark.parametrize("recipe", ["crt", "lws", "tau_norm"])
def test_decoupled_configs_start_from_the_stage1_run(recipe):
    for path in sorted(CONFIGS.glob(f"*/{recipe}*.yaml")):
        cfg = load_config(path)
        stage1 = path.with_name(path.name.replace(recipe, "wb_stage1"))
        assert cfg.method.name == recipe and stage1.exists(), path
        assert cfg.method.init_from == f"runs/{path.parent.name}/{stage1.stem}"
        s1 = load_config(stage1)
        assert (s1.model, s1.data.selection, s1.data.imbalance) == (cfg.model, cfg.data.selection, cfg.data.imbalance)
        if recipe != "tau_norm":
            assert cfg.data.sampler == "class_balanced" and cfg.train.epochs == 10
