"""What each finetune.mode costs on a ViT-B/16: training step time and peak memory, side by side, as ratios.

    PYTHONPATH=. python benchmarks/finetune_cost.py [--steps 3] [--warmup 1] [--threads N] [--json FILE]
    PYTHONPATH=. python benchmarks/finetune_cost.py --tiny      # a tiny ViT: the same code path in seconds

The model is transformers' ViT-B/16 architecture (`hf_vit`, 224 pixels, random weights built from the
config: no checkpoint needed) with a 100-class linear head, trained on random images at batch 8 with
AdamW and the engine's own pieces (`apply_finetune`, the method, `part_groups`). Modes: full, linear,
bias, LoRA (q/v, rank 8), AdaptFormer (dim 64) and LoRA + MORE, that one also with
`train.grad_checkpoint`. Each mode runs in its own subprocess, since a process's peak memory never
resets: peak RSS (VmHWM) on the CPU, max allocated on CUDA. It runs on the CPU, and on CUDA too when
present (`--device` picks one). The table gives ratios to `full`: absolute times depend on the machine
and, on a shared one, on its load; `--json` keeps the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtail.config import load_config  # noqa: E402
from longtail.engine import build_optimizer  # noqa: E402
from longtail.finetune import apply_finetune, parameter_counts, part_groups  # noqa: E402
from longtail.methods import build_method  # noqa: E402
from longtail.methods.base import RunInfo  # noqa: E402
from longtail.models import build_model  # noqa: E402

VIT_B16 = {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "image_size": 224, "patch_size": 16}
TINY = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8}
MODES = {
    "full": [],
    "linear": ["finetune.mode=linear"],
    "bias": ["finetune.mode=bias"],
    "lora": ["finetune.mode=lora"],
    "adaptformer": ["finetune.mode=adaptformer"],
    "lora+more": ["finetune.mode=lora", "more.enabled=true"],
    "lora+more, grad checkpoint": ["finetune.mode=lora", "more.enabled=true", "train.grad_checkpoint=true"],
}
NUM_CLASSES = 100
PROGRESS = 0.5  # mid-training: MORE's sine schedule is at its peak, so both passes carry gradients


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    # VmHWM is this process's own peak RSS; getrusage's ru_maxrss would carry the parent's peak across exec.
    field = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB


def measure(args: argparse.Namespace, mode: str, device_name: str) -> dict:
    """Subprocess body: one mode's model, `warmup` + `steps` training steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    arch = TINY if args.tiny else VIT_B16
    cfg = load_config(None, ["model.name=hf_vit", "optim.name=adamw", "optim.lr=1e-3", *MODES[mode]])
    cfg.model.hf_config = arch
    torch.manual_seed(0)
    model = apply_finetune(build_model(cfg.model, NUM_CLASSES, 3, arch["image_size"]), cfg)
    if cfg.train.grad_checkpoint:
        model.enable_grad_checkpoint()
    counts = [int(500 * 0.01 ** (k / (NUM_CLASSES - 1))) for k in range(NUM_CLASSES)]  # long-tailed, IF 100
    info = RunInfo(cfg=cfg, num_classes=NUM_CLASSES, class_counts=counts, epochs=1, steps_per_epoch=1, device=device)
    method = build_method(cfg, info, lambda logits, y, progress: F.cross_entropy(logits, y))
    model = method.prepare(model).to(device)
    optimizer = build_optimizer(cfg, part_groups(model, method.param_groups(model), cfg))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, arch["image_size"], arch["image_size"], generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device)
    before = memory_mb(device, peak=False)
    times = []
    for _ in range(args.warmup + args.steps):
        method.train_mode(model)
        sync(device)
        start = time.perf_counter()
        loss, _ = method.loss(model, x, y, PROGRESS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = memory_mb(device, peak=True)
    trainable, total = parameter_counts(model)
    return {"step_s": statistics.median(times[args.warmup:]), "peak_mb": peak, "before_mb": before,
            "trainable": trainable, "total": total}


def run_device(args: argparse.Namespace, device: str) -> dict[str, dict]:
    # A fresh process per mode. Forked on the CPU, so torch and transformers are not imported again (the
    # parent has run no torch operator, so no thread pool is copied mid-state; a forked process's peak RSS
    # starts at its size at the fork, the same for every mode); spawned for CUDA, which must not be forked.
    context = multiprocessing.get_context("fork" if device == "cpu" else "spawn")
    import transformers.models.vit.modeling_vit  # noqa: F401  (imported once here, not lazily in every fork)
    results = {}
    for mode in MODES:
        with context.Pool(1) as pool:
            results[mode] = pool.apply(measure, (args, mode, device))
    return results


def print_table(results: dict[str, dict], device: str, args: argparse.Namespace) -> None:
    base = results["full"]
    kind = "max allocated" if device.startswith("cuda") else "peak RSS"
    print(f"\n{'tiny ViT' if args.tiny else 'ViT-B/16'} (random weights), batch {args.batch_size}, {device}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; ratios to full ({kind}; training memory = "
          "peak - memory once the model is built)")
    print(f"{'mode':28s}{'trainable':>12s}{'step time':>11s}{'peak memory':>13s}{'training memory':>17s}")
    for mode, r in results.items():
        growth = (r["peak_mb"] - r["before_mb"]) / max(base["peak_mb"] - base["before_mb"], 1e-9)
        print(f"{mode:28s}{r['trainable'] / r['total']:11.2%} {r['step_s'] / base['step_s']:10.2f}x"
              f"{r['peak_mb'] / base['peak_mb']:12.2f}x{growth:16.2f}x")
    on, off = results["lora+more, grad checkpoint"], results["lora+more"]
    print(f"grad checkpoint on / off for lora+more: step time {on['step_s'] / off['step_s']:.2f}x, training memory "
          f"{(on['peak_mb'] - on['before_mb']) / max(off['peak_mb'] - off['before_mb'], 1e-9):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU, and CUDA when present")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT instead of ViT-B/16: seconds, for tests")
    parser.add_argument("--json", help="also write the absolute numbers here")
    args = parser.parse_args()
    devices = {"all": ["cpu"] + ["cuda"] * torch.cuda.is_available(), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    record = {}
    for device in devices:
        record[device] = run_device(args, device)
        print_table(record[device], device, args)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
