"""MORE diagnostics: per-class discrepancy and per-layer low-rank share, by hand, logged, harmless, plotted."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fake_data import write_cifar10, write_fashion_mnist
from hf_tiny import vit_config
from launch import run_forked
from longtail.analysis import analyze_run
from longtail.checkpoint import load_checkpoint
from longtail.config import from_dict, load_config
from longtail.data.splits import InMemorySplit
from longtail.engine import fit
from longtail.errors import ConfigError
from longtail.finetune import lora_layers
from longtail.lowrank import add_lowrank, lowrank_ratios
from longtail.methods.more import class_discrepancy, group_means
from longtail.models import build_model
from longtail.task import MULTI
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out


class Pixels(nn.Module):
    """features = the two input pixels; a bias-free 2 x 2 head with a rank-1 part B A (s = 1)."""

    def __init__(self, b: list[float], a: list[float]):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)  # eval mode must leave its running statistics alone
        self.head = nn.Linear(2, 2, bias=False)
        part = add_lowrank(self.head, 1, 1.0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.head.parametrizations.weight.original.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
            part.B.copy_(torch.tensor(b).view(2, 1))
            part.A.copy_(torch.tensor(a).view(1, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pixel_split(pixels: list[tuple[int, int]], labels: torch.Tensor, num_classes: int) -> InMemorySplit:
    """Images of 1 x 1 x 2 pixels, each 0 or 255: with mean 0 and std 1 the model sees them as 0 or 1."""
    images = torch.tensor(pixels, dtype=torch.uint8).view(-1, 1, 1, 2) * 255
    return InMemorySplit(images, labels, torch.arange(len(pixels)), [0.0], [1.0], "none", num_classes)


def logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.features(x), model(x)


# z_full - z_gen = (B A) x with B = [1, 0]^T, A = [1, 2]: the difference is (x1 + 2 x2, 0), so the discrepancy
# of x = (1, 0), (0, 1), (1, 1), (0, 0) is 1, 4, 9, 0.
PIXELS = [(1, 0), (0, 1), (1, 1), (0, 0), (1, 1)]


def test_layer_ratio_is_the_frobenius_norm_of_s_b_a_over_that_of_w_g():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 2, bias=False)), nn.Conv2d(2, 4, 3))
    linear, conv = model[0][0], model[1]
    add_lowrank(linear, 1, 0.5, torch.Generator().manual_seed(0))
    add_lowrank(conv, 2, -2.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # ||W_g||_F = 5; B A = [[2, 0, 1], [4, 0, 2]], ||B A||_F = 5; s = 0.5: the ratio is 0.5.
        linear.parametrizations.weight.original.copy_(torch.tensor([[3.0, 0, 0], [0, 4.0, 0]]))
        linear.parametrizations.weight[0].B.copy_(torch.tensor([[1.0], [2.0]]))
        linear.parametrizations.weight[0].A.copy_(torch.tensor([[2.0, 0.0, 1.0]]))
        conv.parametrizations.weight[0].B.normal_()
    ratios = lowrank_ratios(model)
    assert list(ratios) == ["0.0", "1"]  # module paths
    assert ratios["0.0"] == pytest.approx(0.5)
    part = conv.parametrizations.weight[0]
    expected = (2.0 * part.B @ part.A).norm() / conv.parametrizations.weight.original.norm()
    expected = expected.detach()
    assert ratios["1"] == pytest.approx(float(expected))
    assert lowrank_ratios(nn.Linear(2, 2)) == {}


def test_per_class_discrepancy_by_hand_in_eval_mode():
    model = Pixels(b=[1.0, 0.0], a=[1.0, 2.0])
    model.train()
    bn_before = model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone()
    split = pixel_split(PIXELS, torch.tensor([0, 0, 1, 1, 2]), num_classes=4)
    rng = torch.get_rng_state()
    per_class = class_discrepancy(model, split, torch.device("cpu"), 4, logits, batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is not drawn from
    # class 0: (1 + 4) / 2; class 1: (9 + 0) / 2; class 2: 9; class 3 has no sample.
    assert per_class == [pytest.approx(2.5), pytest.approx(4.5), pytest.approx(9.0), None]
    assert model.training and model.bn.training  # modes come back as they were
    assert torch.equal(model.bn.running_mean, bn_before[0]) and torch.equal(model.bn.num_batches_tracked, bn_before[1])
    assert group_means(per_class, ([0, 1], [2, 3], [])) == {"many": pytest.approx(3.5), "medium": pytest.approx(9.0),
                                                            "few": None}


def test_multi_hot_samples_count_for_each_positive_label():
    model = Pixels(b=[1.0, 0.0], a=[1.0, 2.0])
    targets = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])  # discrepancies 1, 4, 9, 0, 9
    per_class = class_discrepancy(model, pixel_split(PIXELS, targets, 3), torch.device("cpu"), 3, logits)
    assert per_class == [pytest.approx(2.5), pytest.approx(5.0), pytest.approx(9.0)]


def _two_rank_worker(rank: int, store: str, queue) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = Pixels(b=[1.0, 0.5], a=[1.0, 2.0])
        split = pixel_split(PIXELS, torch.tensor([0, 0, 1, 1, 2]), 3)  # 5 samples: one rank gets a padding repeat
        queue.put((rank, class_discrepancy(model, split, torch.device("cpu"), 3, logits, batch_size=2)))
    finally:
        tdist.destroy_process_group()


@pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()), reason="no gloo backend")
def test_two_processes_give_the_single_process_values(tmp_path):
    import torch.multiprocessing as mp

    queue = mp.get_context("fork").SimpleQueue()
    run_forked(_two_rank_worker, (str(tmp_path / "store"), queue))
    results = dict(queue.get() for _ in range(2))
    single = class_discrepancy(Pixels(b=[1.0, 0.5], a=[1.0, 2.0]), pixel_split(PIXELS, torch.tensor([0, 0, 1, 1, 2]), 3),
                               torch.device("cpu"), 3, logits)
    assert results[0] == results[1]  # both ranks hold the gathered result
    # Two processes in batches of 2 against one in one batch: sums in another order, float32 tolerance.
    assert results[0] == [None if v is None else pytest.approx(v, rel=1e-5, abs=1e-6) for v in single]


TINY = [*TINY_MLP, "model.width=16", "train.epochs=4", "more.enabled=true", "train.device=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, train_per_class=20, test_per_class=4)
    out = tmp_path_factory.mktemp("runs")
    for name, extra in (("on", ["train.track_every=2"]), ("off", [])):
        fit(load_config(None, [*TINY, *extra]), out / name, data_root=str(root))
    return out, str(root)


def test_diagnostics_are_logged_every_track_every_epochs(runs):
    out, _ = runs
    records = [json.loads(line) for line in (out / "on" / "metrics.jsonl").read_text().splitlines()]
    tracked = [r["epoch"] for r in records if "more_layer_ratio" in r]
    assert tracked == [2, 4] and [r["epoch"] for r in records if "more_discrepancy_per_class" in r] == [2, 4]
    last = records[-1]
    assert set(last["more_layer_ratio"]) == {"body.0", "body.3", "body.6", "head"}
    assert all(v > 0 for v in last["more_layer_ratio"].values())  # B has trained away from 0
    assert len(last["more_discrepancy_per_class"]) == 10 and set(last["more_discrepancy"]) == {"many", "medium", "few"}
    events = EventAccumulator(str(out / "on"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"more/ratio/{layer}" for layer in last["more_layer_ratio"]} <= tags
    for group, value in last["more_discrepancy"].items():
        assert (f"more/discrepancy/{group}" in tags) == (value is not None)
    assert [e.step for e in events.Scalars("more/ratio/head")] == [2, 4]
    off = (out / "off" / "metrics.jsonl").read_text()
    assert "more_layer_ratio" not in off and "more_discrepancy" not in off


def test_diagnostics_do_not_change_training(runs):
    out, _ = runs
    on, off = (load_checkpoint(out / name / "checkpoint.pt")["model"] for name in ("on", "off"))
    assert list(on) == list(off) and all(torch.equal(on[k], off[k]) for k in on)
    on, off = ([json.loads(line)["train_loss"] for line in (out / n / "metrics.jsonl").read_text().splitlines()]
               for n in ("on", "off"))
    assert on == off


def test_analyze_draws_discrepancy_against_frequency_and_ratios_over_epochs(runs, capsys):
    out, root = runs
    result = analyze_run(out / "on", data_root=root)
    assert "MORE at epoch 4: discrepancy many / medium / few" in capsys.readouterr().out
    for name in ("more_discrepancy.png", "more_ratios.png"):
        path = out / "on" / "figures" / name
        assert str(path) in result["figures"] and path.read_bytes()[:4] == b"\x89PNG", name
    analyze_run(out / "off", data_root=root)
    assert not (out / "off" / "figures" / "more_ratios.png").exists()


def test_multilabel_runs_log_the_diagnostics_without_the_fdr_tracking(tmp_path):
    with pytest.raises(ConfigError, match="train.track_every"):
        MULTI.check(from_dict({"loss": {"name": "bce"}, "train": {"track_every": 1}}))
    MULTI.check(from_dict({"loss": {"name": "bce"}, "train": {"track_every": 1}, "more": {"enabled": True}}))
    write_cifar10(tmp_path / "root", train_per_class=30, test_per_class=10, noise=True)
    cfg = {"data": {"name": "cifar10_mosaic_mlt", "mosaic_train_images": 64, "mosaic_test_images": 20,
                    "batch_size": 32}, "model": {"name": "mlp", "width": 16}, "loss": {"name": "bce"},
           "more": {"enabled": True}, "train": {"epochs": 1, "device": "cpu", "track_every": 1}}
    fit(from_dict(cfg), tmp_path / "run", data_root=str(tmp_path / "root"))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "track" not in record and len(record["more_discrepancy_per_class"]) == 10
    assert all(v is not None for v in record["more_discrepancy"].values())  # the published head / medium / tail


def test_lora_more_on_a_tiny_hf_vit_logs_the_diagnostics_of_every_lora_target(tmp_path):
    pytest.importorskip("transformers")
    write_cifar10(tmp_path / "root", train_per_class=6, test_per_class=2)
    cfg = load_config(None, ["model.name=hf_vit", "finetune.mode=lora", "finetune.lora_rank=2", "more.enabled=true",
                             "train.track_every=1", "data.imbalance=2", "data.batch_size=16", "data.augment=none",
                             "train.epochs=1", "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64",
                             "train.device=cpu"])
    cfg.model.hf_config = vit_config()
    fit(cfg, tmp_path / "run", data_root=str(tmp_path / "root"))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    model = build_model(cfg.model, num_classes=10)
    targets = {name for name, _ in lora_layers(model, model.lora_targets)}
    assert len(targets) == 4  # query and value of the 2 layers
    ratios = record["more_layer_ratio"]
    assert set(ratios) == targets  # one per LoRA part, MORE's own: named by the LoRA target's module path
    per_class, groups = record["more_discrepancy_per_class"], record["more_discrepancy"]
    assert len(per_class) == 10 and set(groups) == {"many", "medium", "few"}
    assert groups["few"] is not None  # 3 to 6 images a class: all few by the 10-class thresholds
    # B trained away from 0 in the epoch, so every part and every class shows a discrepancy
    values = [*ratios.values(), *per_class, *(v for v in groups.values() if v is not None)]
    assert all(math.isfinite(v) and v > 0 for v in values)
