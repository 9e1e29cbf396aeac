"""LoRA + MORE with gradient checkpointing under torchrun: 2 CPU processes (gloo), a tiny CLIP, an exact resume.

An uninterrupted 2-process run is the reference; a second run is stopped by a signal to rank 1 in the
middle of epoch 2 and resumed on 2 processes, and must end with the reference's weights and results, bit
for bit.
"""
import json
import math
import os
import re

import pytest
import torch
import torch.distributed as tdist

from fake_data import write_cifar10
from launch import launch
from test_distributed import SIGNAL_DRIVER, TORCHRUN

pytest.importorskip("transformers")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="this torch build has no gloo backend for CPU processes")]

PER_CLASS, IMBALANCE, BATCH = 8, 2, 8


def test_two_process_lora_more_with_grad_checkpoint_resumes_bit_for_bit(tmp_path, clip_dir):
    root, ckpt = tmp_path / "data", clip_dir[0]
    write_cifar10(root, train_per_class=PER_CLASS, test_per_class=2)
    config = tmp_path / "empty.yaml"
    config.write_text("")
    env = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
           "LONGTAIL_DATA": str(root), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # log_every=1: under DDP the stop flag is read only at log points.
    args = ["model.name=hf_clip", f"model.pretrained={ckpt}", "finetune.mode=lora", "finetune.lora_rank=2",
            "more.enabled=true", "train.grad_checkpoint=true", f"data.imbalance={IMBALANCE}",
            f"data.batch_size={BATCH}", "train.epochs=2", "train.log_every=1", "optim.name=adamw",
            "optim.lr=1e-2", "eval.batch_size=64"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    done, _ = launch([*TORCHRUN, "-m", "longtail", "train", config, *args, "--out", reference], env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    images = int(re.search(r"(\d+) train images", done.stdout + done.stderr).group(1))
    steps = math.ceil(math.ceil(images / 2) / BATCH)  # per epoch: each rank's share in batches
    stop = {**env, "LONGTAIL_TEST_STOP_AT": str(steps + 2)}  # rank 1's second forward of epoch 2
    done, _ = launch([*TORCHRUN, driver, "train", config, *args, "--out", run], stop, timeout=300)
    assert done.returncode != 0 and "stopped by signal" in done.stderr, done.stderr[-3000:]
    partial = torch.load(run / "checkpoint.pt", weights_only=True)["partial"]
    assert partial["world"] == 2 and partial["epoch"] == 1 and 0 < partial["batch"] < steps
    done, _ = launch([*TORCHRUN, "-m", "longtail", "train", config, *args, "--out", run, "--resume"], env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    resumed, uninterrupted = (torch.load(d / "model.pt", weights_only=True) for d in (run, reference))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    a, b = (json.loads((d / "results.json").read_text()) for d in (run, reference))
    for key in ("top1", "balanced", "nll", "per_class"):
        assert a[key] == b[key], key
