"""End to end on tiny fake data: train, kill, resume, evaluate, export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from longtail.checkpoint import load_checkpoint
from longtail.config import load_config
from longtail.engine import fit, lr_factor
from longtail.errors import ConfigError, DivergedError
from longtail.methods import register_method
from longtail.methods.base import Method
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [*TINY_MLP, "train.epochs=3"]


def _cli(*args, env_root):
    env = {**os.environ, "LONGTAIL_DATA": str(env_root)}
    return subprocess.run([sys.executable, "-m", "longtail", *args], capture_output=True, text=True, env=env)


def test_run_directory_has_every_file(tmp_path, data_root):
    out = tmp_path / "run"
    results = fit(load_config(None, TINY), out, data_root=str(data_root))
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "results.json", "model.pt", "model.yaml"):
        assert (out / name).exists(), name
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    saved = json.loads((out / "results.json").read_text())
    for key in ("top1", "balanced", "many", "medium", "few", "ece", "nll", "per_class", "class_counts",
                "thresholds", "split", "checkpoint", "epoch", "seed", "config"):
        assert key in saved, key
    assert saved["checkpoint"] == "final" and saved["epoch"] == 3 and saved["thresholds"] == [1000, 200]
    assert saved["class_counts"] == results["class_counts"] and len(saved["per_class"]) == 10
    assert saved["class_names"][:2] == ["T-shirt/top", "Trouser"]  # what `report --plot` labels classes with
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and "test" in lines[-1]
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path, data_root):
    overrides = [*TINY, "train.epochs=4"]
    # Both runs in fresh processes: the same thread count, so the same floating-point reduction order.
    config = tmp_path / "tiny.yaml"
    config.write_text("")
    reference = tmp_path / "reference"
    assert _cli("train", str(config), *overrides, "--out", str(reference), env_root=data_root).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "LONGTAIL_DATA": str(data_root)}
    proc = subprocess.Popen([sys.executable, "-m", "longtail", "train", str(config), *overrides, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoint.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    resumed = _cli("train", str(config), *overrides, "--out", str(killed), "--resume", env_root=data_root)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, killed))
    assert ra["per_class"] == rb["per_class"] and ra["nll"] == rb["nll"]
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_resume_refuses_a_changed_config(tmp_path, data_root):
    out = tmp_path / "run"
    fit(load_config(None, [*TINY, "train.epochs=1"]), out, data_root=str(data_root))
    with pytest.raises(ConfigError, match="optim.lr"):
        fit(load_config(None, [*TINY, "train.epochs=1", "optim.lr=0.5"]), out, resume=True, data_root=str(data_root))
    with pytest.raises(ConfigError, match="--resume"):
        fit(load_config(None, [*TINY, "train.epochs=1"]), out, data_root=str(data_root))


def test_resume_takes_a_checkpoint_saved_before_a_config_key_existed(tmp_path, data_root):
    out = tmp_path / "run"
    fit(load_config(None, [*TINY, "train.epochs=1"]), out, data_root=str(data_root))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["optim"]["wd_exclude_bn_bias"]  # as if written by a version without that key (default false)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    results = fit(load_config(None, [*TINY, "train.epochs=1"]), out, resume=True, data_root=str(data_root))
    assert results["epoch"] == 1


def test_a_last_batch_of_one_image_is_skipped(tmp_path, data_root):
    cfg = load_config(None, [*TINY, "data.batch_size=18", "train.epochs=1"])  # 199 images = 11 x 18 + 1
    results = fit(cfg, tmp_path / "run", data_root=str(data_root))
    assert len(results["per_class"]) == 10


def test_unknown_method_names_the_registered_ones(tmp_path, data_root):
    with pytest.raises(ConfigError, match="unknown method 'wb'.*erm, ewb"):
        fit(load_config(None, [*TINY, "method.name=wb"]), tmp_path / "run", data_root=str(data_root))


class NanAfterFirstEpoch(Method):
    def criterion(self, features, logits, y, progress):
        loss, logs = super().criterion(features, logits, y, progress)
        return (loss * float("nan") if progress >= 0.5 else loss), logs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    register_method("nan_test", f"{__name__}:NanAfterFirstEpoch")
    cfg = load_config(None, [*TINY, "train.epochs=2"])
    cfg.method.name = "nan_test"
    with pytest.raises(DivergedError, match="last good checkpoint"):
        fit(cfg, tmp_path / "run", data_root=str(data_root))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class NanFromTheStart(Method):
    def criterion(self, features, logits, y, progress):
        loss, logs = super().criterion(features, logits, y, progress)
        return loss * float("nan"), logs


def test_a_loss_non_finite_before_any_checkpoint_says_none_is_kept(tmp_path, data_root):
    register_method("nan_start_test", f"{__name__}:NanFromTheStart")
    cfg = load_config(None, TINY)
    cfg.method.name = "nan_start_test"
    with pytest.raises(DivergedError, match="no checkpoint had been written yet, so the same command starts the run "
                                            "over"):
        fit(cfg, tmp_path / "run", data_root=str(data_root))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_best_val_selection_is_recorded(tmp_path, data_root):
    cfg = load_config(None, [*TINY, "data.val_per_class=3", "eval.select=best_val"])
    results = fit(cfg, tmp_path / "run", data_root=str(data_root))
    assert results["checkpoint"] == "best_val" and 1 <= results["epoch"] <= 3
    assert (tmp_path / "run" / "best.pt").exists()


def test_selection_split_is_evaluated_every_epoch_and_test_only_when_scheduled(tmp_path, data_root):
    cfg = load_config(None, [*TINY, "train.epochs=4", "data.val_per_class=3", "eval.select=best_val", "eval.every=2"])
    fit(cfg, tmp_path / "run", data_root=str(data_root))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("val" in r, "test" in r) for r in lines] == [(True, False), (True, True), (True, False), (True, True)]


@pytest.mark.parametrize("override", ["eval.select=best_val", "posthoc.kind=additive"])
def test_choices_needing_a_validation_split_are_refused_before_training(tmp_path, data_root, override):
    with pytest.raises(ConfigError, match="val_per_class"):
        fit(load_config(None, [*TINY, override]), tmp_path / "run", data_root=str(data_root))
    assert not (tmp_path / "run").exists()


def test_eval_cli_reproduces_results_and_draws_plots(tmp_path, data_root):
    out = tmp_path / "run"
    results = fit(load_config(None, TINY), out, data_root=str(data_root))
    proc = _cli("eval", str(out), "--plots", env_root=data_root)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "eval-test.json").read_text())
    # Another process (its own threads): logits equal at float32 tolerance; accuracies count argmaxes, which
    # only a tie closer than float32 rounding could flip, so they match exactly.
    assert again["per_class"] == results["per_class"]
    assert again["top1"] == results["top1"]
    for key in ("ece", "nll"):
        assert again[key] == pytest.approx(results[key], rel=1e-5, abs=1e-5), key
    for name in ("per_class-test.png", "confusion-test.png", "reliability-test.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["top1"] == results["top1"]


def test_eval_takes_a_model_pt_and_names_a_wrong_path(tmp_path, data_root):
    from longtail.engine import evaluate_run

    out = tmp_path / "run"
    results = fit(load_config(None, TINY), out, data_root=str(data_root))
    assert evaluate_run(out / "model.pt", data_root=str(data_root))["per_class"] == results["per_class"]
    assert (out / "eval-test.json").exists()
    with pytest.raises(ConfigError, match="modle.pt does not exist"):  # no fallback to the folder's model.pt
        evaluate_run(out / "modle.pt", data_root=str(data_root))
    with pytest.raises(ConfigError, match="checkpoint.pt is not an exported model"):
        evaluate_run(out / "checkpoint.pt", data_root=str(data_root))


def test_schedule_warmup_then_steps():
    cfg = load_config(None, ["train.epochs=10", "schedule.warmup_epochs=0.1"])
    factors = [lr_factor(s, cfg, steps_per_epoch=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[79] == 1.0 and factors[80] == pytest.approx(0.01) and factors[90] == pytest.approx(1e-4)
    cos = load_config(None, ["train.epochs=10", "schedule.name=cosine", "schedule.warmup_epochs=0"])
    assert lr_factor(0, cos, 10) == pytest.approx(1.0) and lr_factor(50, cos, 10) == pytest.approx(0.5)


def test_weight_decay_can_spare_norm_layers_and_biases():
    from longtail.engine import build_optimizer
    from longtail.models import build_model

    cfg = load_config(None, ["model.name=mlp", "model.width=8", "optim.wd_exclude_bn_bias=true", "optim.name=adamw"])
    model = build_model(cfg.model, 3, 1, 4)
    method = Method(cfg, None, None)
    optimizer = build_optimizer(cfg, method.param_groups(model))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == cfg.optim.weight_decay and spared["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in spared["params"])
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_linear_lr_scaling_rule():
    from longtail.engine import effective_lr

    cfg = load_config(None, ["optim.lr=0.1", "data.batch_size=64", "optim.lr_scaling=linear", "optim.base_batch_size=256"])
    assert effective_lr(cfg) == pytest.approx(0.025)  # one process: 64 / 256 of the base lr
    assert effective_lr(load_config(None, ["optim.lr=0.1"])) == 0.1


class ExplodesAtFirstEpochEnd(Method):
    """Weights that blow up without a non-finite training loss (it is computed before the blow-up)."""

    def after_epoch(self, model, epoch):
        if epoch == 1:
            with torch.no_grad():
                model.head.weight.fill_(float("inf"))


def test_non_finite_logits_are_never_recorded_or_checkpointed(tmp_path, data_root):
    register_method("explode_test", f"{__name__}:ExplodesAtFirstEpochEnd")
    cfg = load_config(None, [*TINY, "train.epochs=3"])
    cfg.method.name = "explode_test"
    with pytest.raises(DivergedError, match="logits are not finite"):
        fit(cfg, tmp_path / "run", data_root=str(data_root))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 0  # epoch 2 was not saved
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / "run" / "results.json").exists()
