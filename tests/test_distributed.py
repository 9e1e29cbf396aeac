"""Multi-process training under torchrun: 2 CPU processes (gloo) on tiny fake Fashion-MNIST-LT.

One 2-process MORE run, logging MORE's diagnostics of its last epoch, is the reference. A second run,
identical but for rank 1 failing in the middle of epoch 2 (and not tracking), must end the launcher with an
error and leave its epoch-1 checkpoint, which then resumes on 2 processes (to the reference's exact weights)
and on 1 process (on that world size's lr schedule).
"""
import json
import math
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from launch import launch, run_forked
from fake_data import write_fashion_mnist, write_idx
from longtail import distributed
from longtail.config import load_config
from longtail.data.idx import read_idx
from longtail.data.samplers import SAMPLERS, epoch_order
from longtail.data.splits import InMemorySplit
from longtail.engine import effective_lr, lr_factor
from longtail.errors import ConfigError
from tiny import TINY_MLP

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="this torch build has no gloo backend for CPU processes")]

TEST_IMAGES = 99  # odd: the 2-process evaluation pads one duplicate, which must not be counted
TRAIN = [*TINY_MLP, "data.augment=crop_flip", "train.epochs=3", "optim.lr_scaling=linear", "schedule.name=cosine",
         "eval.batch_size=16", "more.enabled=true"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]

# `longtail` with rank 1 raising in its LONGTAIL_TEST_FAIL_AT-th training forward, while rank 0 goes on
# into that step's gradient all-reduce and waits in it.
DRIVER = """
import os, sys
from longtail import distributed
from longtail.cli import main

fail_at, forward, calls = int(os.environ["LONGTAIL_TEST_FAIL_AT"]), distributed.MethodStep.forward, [0]

def forward_or_fail(self, *args):
    calls[0] += 1
    if distributed.rank() == 1 and calls[0] == fail_at:
        raise RuntimeError("injected failure of rank 1")
    return forward(self, *args)

distributed.MethodStep.forward = forward_or_fail
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    fake = write_fashion_mnist(root, train_per_class=40, test_per_class=10)
    for name, ndim in (("t10k-images-idx3-ubyte", 3), ("t10k-labels-idx1-ubyte", 1)):
        write_idx(fake.path / name, read_idx(fake.path / f"{name}.gz", ndim)[:TEST_IMAGES], gz=True)
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**base, "LONGTAIL_DATA": str(root), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("")
    return path


def _train(config: Path, out: Path, *extra: str) -> list:
    return ["train", config, *TRAIN, "--out", out, *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    # track_every=3: MORE's diagnostics (and the FDR) of the last epoch's model, here alone, as they cost a second
    # a run; the resumed runs below do not track, so matching these weights also shows tracking changes no training.
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, "train.track_every=3")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, env, config) -> tuple[Path, subprocess.CompletedProcess, float]:
    tmp = tmp_path_factory.mktemp("crash")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    steps = math.ceil(math.ceil(199 / 2) / 16)  # 199 training images at imbalance 5; batch 16 per rank
    out = tmp / "run"
    done, seconds = launch([*TORCHRUN, driver, *_train(config, out)], {**env, "LONGTAIL_TEST_FAIL_AT": str(steps + 3)})
    return out, done, seconds


def test_two_process_results_equal_a_single_process_eval_of_the_exported_model(reference, env):
    results = json.loads((reference / "results.json").read_text())
    assert results["world_size"] == 2 and results["effective_batch_size"] == 32
    assert results["effective_lr"] == pytest.approx(0.1)  # linear rule: 0.05 * 2 processes * 16 / 16
    assert results["num_samples"] == TEST_IMAGES  # the padding duplicate is dropped

    done, _ = launch([sys.executable, "-m", "longtail", "eval", reference], env)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((reference / "eval-test.json").read_text())
    assert single["num_samples"] == TEST_IMAGES
    # Identical only if both ranks evaluated rank 0's exported weights, BN running statistics included.
    assert results["per_class"] == single["per_class"]
    for key in ("top1", "balanced", "many", "medium", "few"):
        assert results[key] == single[key], key
    assert results["nll"] == pytest.approx(single["nll"], rel=1e-5)
    assert results["ece"] == pytest.approx(single["ece"], rel=1e-4, abs=1e-6)


def test_more_runs_on_two_processes(reference):
    results = json.loads((reference / "results.json").read_text())
    assert results["method"] == "erm+more"
    records = _metrics(reference)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("more_loss" in r and math.isfinite(r["more_loss"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    merged = torch.load(reference / "model.pt", weights_only=True)
    assert not any("parametrizations" in k for k in merged)  # the low-rank parts were merged before export


def test_two_process_more_diagnostics_equal_one_process_on_the_saved_checkpoint(reference, env, config):
    """Each rank evaluated its share of the 199 training images (one a padding repeat), gathered by index."""
    from longtail.engine import setup

    logged = _metrics(reference)[-1]
    state = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2  # the last epoch (0-based), saved right after its diagnostics: the model they measured
    run = setup(load_config(config, [*TRAIN, "train.device=cpu"]), data_root=env["LONGTAIL_DATA"])
    run.model.load_state_dict(state["model"])
    single = run.method.diagnostics(run.model, run.data.train, run.device)
    assert logged["more_layer_ratio"] == single["more_layer_ratio"]  # the same weights, the same arithmetic
    assert set(logged["more_layer_ratio"]) == {"body.0", "body.3", "body.6", "head"}
    # A rank's batches of 16 hold other images than one process's, so a float32 logit may round differently
    # (measured: one class of ten off by 9e-9 in about 5e-2); rel 1e-5 still fails a wrong count or share.
    assert logged["more_discrepancy_per_class"] == pytest.approx(single["more_discrepancy_per_class"], rel=1e-5)
    assert set(logged["more_discrepancy"]) == {"many", "medium", "few"}
    for group, value in single["more_discrepancy"].items():  # an empty group is None in both
        assert logged["more_discrepancy"][group] == (None if value is None else pytest.approx(value, rel=1e-5)), group
    assert all(v is not None and v > 0 for v in logged["more_discrepancy_per_class"])


def test_a_failing_rank_ends_the_launch_with_an_error_instead_of_hanging(crashed):
    out, done, seconds = crashed
    assert done.returncode != 0
    assert "injected failure of rank 1" in done.stderr
    assert seconds < 120, f"the launcher needed {seconds:.0f} s to give up"
    assert not (out / "results.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0  # epoch 1 was saved, epoch 2 was not


def test_crashed_run_resumes_on_two_processes_to_the_uninterrupted_weights(crashed, reference, env, config, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(crashed[0], out)
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, "--resume")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in _metrics(out)] == [1, 2, 3]
    resumed = torch.load(out / "model.pt", weights_only=True)
    uninterrupted = torch.load(reference / "model.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_two_process_checkpoint_resumes_on_one_process_with_its_own_schedule(crashed, env, config, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(crashed[0], out)
    done, _ = launch([sys.executable, "-m", "longtail", *_train(config, out, "--resume")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 1 and results["effective_batch_size"] == 16
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # From epoch 2 on, the lr is that of a 1-process run: its steps per epoch, its linearly scaled lr.
    cfg = load_config(None, TRAIN)
    steps = math.ceil(199 / 16)
    assert records[1]["lr"] == pytest.approx(effective_lr(cfg) * lr_factor(2 * steps, cfg, steps), rel=1e-9)
    assert records[0]["lr"] != pytest.approx(records[1]["lr"])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_interleave_to_the_single_process_epoch_order(sampler, world):
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 20, 9, 4, 2]))  # 75 images, long-tailed
    if sampler == "class_aware":  # multi-label: one-hot rows, every third image also carrying class 4
        labels = torch.nn.functional.one_hot(labels, 5)
        labels[::3, 4] = 1
    split = InMemorySplit(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels, torch.arange(len(labels)),
                          mean=[0.5], std=[0.5], augment="none", num_classes=5)
    for epoch in (0, 1):
        order = epoch_order(labels, 5, sampler, seed=3, epoch=epoch)
        shares = [torch.cat([idx for _, _, idx in split.batches(8, sampler=sampler, seed=3, epoch=epoch,
                                                                 rank=r, world=world)]) for r in range(world)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == math.ceil(len(labels) / world)
        interleaved = torch.stack(shares, dim=1).reshape(-1)
        assert torch.equal(interleaved[:len(labels)], order)
        assert torch.equal(interleaved[len(labels):], order[:len(interleaved) - len(labels)])  # padding only


def _collectives_worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=30))
    try:
        cpu = torch.device("cpu")
        # A key logged by one rank only must neither hang the other nor be diluted by it.
        logged = {"loss": 1.0 + 2 * rank, **({"tail_only": 5.0} if rank == 1 else {})}
        assert distributed.mean_over_ranks(logged) == {"loss": 2.0, "tail_only": 5.0}

        class SquaredOutput:  # a method whose loss is the mean squared output of the model
            def loss(self, model, x, y, progress):
                return model(x).pow(2).mean(), {}

        torch.manual_seed(0)
        rank0_start = nn.Linear(2, 1)
        torch.manual_seed(rank)
        net = nn.Linear(2, 1)
        step = distributed.training_step(net, SquaredOutput(), cpu, find_unused_parameters=False)
        assert torch.equal(net.weight, rank0_start.weight)  # wrapping broadcast rank 0's parameters
        loss, _ = step(torch.full((4, 2), rank + 1.0), None, 0.0)
        loss.backward()
        expected = torch.zeros_like(net.weight)
        for r in range(2):  # each rank's own gradient, then their mean
            rank0_start.zero_grad()
            rank0_start(torch.full((4, 2), r + 1.0)).pow(2).mean().backward()
            expected += rank0_start.weight.grad / 2
        assert torch.allclose(net.weight.grad, expected)

        model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        model[1].running_mean.fill_(rank)
        model[1].running_var.fill_(1.0 + 2 * rank)
        distributed.average_bn_stats(model)
        assert torch.equal(model[1].running_mean, torch.full((3,), 0.5))
        assert torch.equal(model[1].running_var, torch.full((3,), 2.0))

        with pytest.raises(ConfigError, match="train.sync_bn"):
            distributed.convert_sync_batchnorm(model, cpu)
        del step  # its gradient reducer holds the group: freed after the group is gone, gloo can hang on it
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def test_collective_helpers_agree_across_two_ranks(tmp_path):
    # fork, not spawn: the workers need nothing re-imported (two torch imports take ~10 s on a loaded machine).
    run_forked(_collectives_worker, (str(tmp_path / "store"),))


# `longtail` with rank 1 sending itself SIGUSR2 (as SLURM via submitit would) before its
# LONGTAIL_TEST_STOP_AT-th training forward; rank 0 gets no signal and must stop with it.
SIGNAL_DRIVER = """
import os, signal, sys
from longtail import distributed
from longtail.cli import main

stop_at, forward, calls = int(os.environ["LONGTAIL_TEST_STOP_AT"]), distributed.MethodStep.forward, [0]

def forward_then_signal(self, *args):
    calls[0] += 1
    if distributed.rank() == 1 and calls[0] == stop_at:
        os.kill(os.getpid(), signal.SIGUSR2)
    return forward(self, *args)

distributed.MethodStep.forward = forward_then_signal
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_to_one_rank_stops_every_rank_mid_epoch_and_the_resume_is_exact(reference, env, config, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    steps = math.ceil(math.ceil(199 / 2) / 16)
    out = tmp_path / "run"
    # log_every may differ on resume and from the reference: it changes when flags are read, not what is computed.
    done, _ = launch([*TORCHRUN, driver, *_train(config, out, "train.log_every=2")],
                     {**env, "LONGTAIL_TEST_STOP_AT": str(steps + 3)})
    assert done.returncode != 0 and "stopped by signal" in done.stderr, done.stderr[-3000:]
    partial = torch.load(out / "checkpoint.pt", weights_only=True)["partial"]
    assert partial["world"] == 2 and partial["epoch"] == 1 and partial["batch"] == 3  # the check after step 3
    assert len(partial["ranks"]) == 2 and not (out / "results.json").exists()
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, "train.log_every=2", "--resume")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out / "model.pt", weights_only=True)
    uninterrupted = torch.load(reference / "model.pt", weights_only=True)
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_mixing_and_policies_run_on_two_processes(env, config, tmp_path):
    """MixedTargets pass through DistributedDataParallel's forward to the loss and MORE's weights."""
    out = tmp_path / "run"
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, "train.epochs=1", "data.policy=randaugment",
                                                           "data.cutout=8", "data.mixup_alpha=0.4",
                                                           "data.cutmix_alpha=1.0")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _metrics(out)[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["more_loss"])


# Every MORE variant at once, the phase boundary in the middle of epoch 2 (step 11 of 21): a 2-process run must
# train, evaluate and log its diagnostics as one process would, keep the general part frozen after the boundary,
# and resume mid-phase-2 to the uninterrupted weights.
VARIANTS = ["more.groups=2", "more.general_loss_weight=0.5", "more.orthogonal_weight=0.1",
            "more.rank_allocation=importance", "more.freeze_general_at=0.5", "train.find_unused_parameters=true",
            "train.track_every=3"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory, env, config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "variants"
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, *VARIANTS)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_freeze_general_at_on_two_processes_needs_find_unused_parameters(env, config, tmp_path):
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, tmp_path / "run", *VARIANTS[:-2])], env)
    assert done.returncode != 0
    assert "longtail train: error: more.freeze_general_at: on several processes" in done.stderr
    assert "add train.find_unused_parameters=true" in done.stderr


def test_every_variant_on_two_processes_evaluates_and_measures_as_one_process(variants, env, config):
    from longtail.engine import setup

    results = json.loads((variants / "results.json").read_text())
    assert results["world_size"] == 2 and results["method_record"]["more_ranks"]
    done, _ = launch([sys.executable, "-m", "longtail", "eval", variants], env)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((variants / "eval-test.json").read_text())
    assert results["per_class"] == single["per_class"]
    assert results["nll"] == pytest.approx(single["nll"], rel=1e-5)

    logged = _metrics(variants)[-1]
    state = torch.load(variants / "checkpoint.pt", weights_only=True)
    run = setup(load_config(config, [*TRAIN, *VARIANTS[:-2], "train.device=cpu"]), data_root=env["LONGTAIL_DATA"])
    run.model.load_state_dict(state["model"])
    measured = run.method.diagnostics(run.model, run.data.train, run.device)
    assert logged["more_layer_ratio"] == pytest.approx(measured["more_layer_ratio"], rel=1e-5)
    assert logged["more_discrepancy_per_class"] == pytest.approx(measured["more_discrepancy_per_class"], rel=1e-5)


def _general(state: dict) -> dict:
    """The general part of a decomposed model's state: every parameter but the low-rank A and B."""
    return {k: v for k, v in state.items()
            if v.is_floating_point() and "running_" not in k and not k.endswith((".A", ".B"))}


def test_every_variant_resumes_mid_phase_two_on_two_processes_to_the_uninterrupted_weights(variants, env, config,
                                                                                          tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    out = tmp_path / "run"
    steps = math.ceil(math.ceil(199 / 2) / 16)  # 7 a epoch; the boundary at step 11 of 21
    done, _ = launch([*TORCHRUN, driver, *_train(config, out, *VARIANTS)],
                     {**env, "LONGTAIL_TEST_STOP_AT": str(steps + 6)})
    assert done.returncode != 0 and "stopped by signal" in done.stderr, done.stderr[-3000:]
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)
    assert stopped["partial"]["epoch"] == 1 and stopped["partial"]["batch"] > 11 - steps  # inside phase 2
    done, _ = launch([*TORCHRUN, "-m", "longtail", *_train(config, out, *VARIANTS, "--resume")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out / "model.pt", weights_only=True)
    uninterrupted = torch.load(variants / "model.pt", weights_only=True)
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    # After the boundary the general part is frozen on both ranks: no step, no weight decay moved it.
    final = _general(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    assert final.keys() == _general(stopped["model"]).keys() and len(final) > 6
    for key, value in _general(stopped["model"]).items():
        assert torch.equal(value, final[key]), key
