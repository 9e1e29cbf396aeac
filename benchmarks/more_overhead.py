"""What MORE costs: training step time, peak memory, and inference time after the merge.

    python benchmarks/more_overhead.py [--model resnet32] [--batch-size 128] [--repeats 9] [--threads 1]

(a) one training step (same model, CE loss, SGD) with and without MORE, interleaved, split into
    forward (full), forward (general-only), loss terms, backward and optimiser step;
(b) peak memory of a few training steps, each variant in its own subprocess (peak RSS on CPU,
    max allocated on CUDA);
(c) inference time of the base model, the merged MORE model and the unmerged one;
(d) with --profile-backward, the operators that take a backward pass's time, per variant;
(e) with --variants, the training step of each MORE variant (docs/methods/more.md#variants) beside the
    base step and default MORE, interleaved; the merged model of every variant is the base model, so
    inference costs what (c) shows.
Inputs are random CIFAR-sized tensors. The variants run interleaved, one after the other in every
round, so the headline ratios are medians of per-round ratios: steady even on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtail.config import from_dict  # noqa: E402
from longtail.losses import build_loss  # noqa: E402
from longtail.methods.base import Method, RunInfo  # noqa: E402
from longtail.methods.more import lowrank_parameters, merge, wrap_if_enabled  # noqa: E402
from longtail.models import build_model  # noqa: E402

NUM_CLASSES = 10
PROGRESS = 0.5  # mid-training: the sine schedule's alpha is at its peak, so both passes carry gradients


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# (e): each variant's keys; freeze_general_at is timed in its second phase (PROGRESS is 0.5, the boundary 0.25).
VARIANTS = {
    "general_lr_scale=0.1": {"general_lr_scale": 0.1},
    "freeze_general_at=0.25": {"freeze_general_at": 0.25},
    "general_loss_weight=1": {"general_loss_weight": 1.0},
    "groups=3": {"groups": 3},
    "groups=3 features": {"groups": 3, "grouping": "features"},
    "orthogonal_weight=1": {"orthogonal_weight": 1.0},
    "rank_allocation=importance": {"rank_allocation": "importance"},
}


def build(args: argparse.Namespace, more: bool | dict, device: torch.device) -> tuple[nn.Module, Method, Method]:
    """(model, method, the plain method inside it) for one variant: MORE off, at its defaults (True) or with
    the given `more` keys."""
    keys = more if isinstance(more, dict) else {}
    cfg = from_dict({"model": {"name": args.model}, "more": {"enabled": bool(more), **keys}})
    counts = [int(500 * 0.01 ** (k / (NUM_CLASSES - 1))) for k in range(NUM_CLASSES)]  # CIFAR-10-LT, IF 100
    info = RunInfo(cfg=cfg, num_classes=NUM_CLASSES, class_counts=counts, epochs=1, steps_per_epoch=1, device=device)
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES, 3, 32)
    inner = Method(cfg, info, build_loss(cfg.loss, counts, 1))
    method = wrap_if_enabled(inner, cfg, info)
    # What rank_allocation and grouping measure on the training data before training; the step is timed here.
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (32,), generator=gen)
    method.probe_loss = lambda m: nn.functional.cross_entropy(m(x.to(next(m.parameters()).dtype)), y)
    method.class_feature_means = lambda m: torch.randn(NUM_CLASSES, 16, generator=gen)
    model = method.prepare(model).to(device)
    return model, method, inner


class Trainer:
    """One variant's training step, timing each call of the plain method's forward pass."""

    def __init__(self, args: argparse.Namespace, more: bool | dict, device: torch.device):
        self.model, self.method, inner = build(args, more, device)
        self.device = device
        self.optimizer = torch.optim.SGD(self.method.param_groups(self.model), lr=0.01, momentum=0.9)
        self.passes: list[float] = []
        forward = inner.forward

        def timed_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sync(device)
            start = time.perf_counter()
            out = forward(model, x)
            sync(device)
            self.passes.append(time.perf_counter() - start)
            return out

        inner.forward = timed_forward
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device)

    def step(self) -> dict[str, float]:
        self.method.train_mode(self.model)
        self.passes.clear()
        sync(self.device)
        t0 = time.perf_counter()
        loss, _ = self.method.loss(self.model, self.x, self.y, PROGRESS)
        sync(self.device)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        self.method.after_step(self.model)
        sync(self.device)
        t3 = time.perf_counter()
        general = self.passes[1] if len(self.passes) > 1 else 0.0
        return {
            "forward (full)": self.passes[0],
            "forward (general)": general,
            "loss terms": (t1 - t0) - self.passes[0] - general,
            "backward": t2 - t1,
            "optimizer": t3 - t2,
            "total": t3 - t0,
        }


def interleaved(fns: dict[str, Callable[[], dict[str, float]]], warmup: int, repeats: int) -> dict[str, list]:
    """Run every variant once per round, so load from other processes hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return samples


def median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def paired_ratio(samples: list[dict[str, float]], reference: list[dict[str, float]], key: str) -> float:
    """Median over rounds of the ratio within a round: both ran back to back, under the same load."""
    return statistics.median(s[key] / r[key] for s, r in zip(samples, reference))


def training_time(args: argparse.Namespace, device: torch.device) -> None:
    base, more = Trainer(args, False, device), Trainer(args, True, device)
    runs = interleaved({"base": base.step, "more": more.step}, args.warmup, args.repeats)
    print(f"(a) training step, median of {args.repeats} interleaved repeats after {args.warmup} warm-up steps (ms)")
    print(f"    {'':20s}{'base':>10s}{'MORE':>10s}{'ratio':>10s}")
    for key in runs["base"][0]:
        b, m = median(runs["base"], key) * 1e3, median(runs["more"], key) * 1e3
        if key == "forward (general)":
            print(f"    {key:20s}{'-':>10s}{m:10.1f}")
        elif b < 1.0:  # a ratio of sub-millisecond timings is noise
            print(f"    {key:20s}{b:10.1f}{m:10.1f}")
        else:
            print(f"    {key:20s}{b:10.1f}{m:10.1f}{m / b:9.2f}x")
    ratio = paired_ratio(runs["more"], runs["base"], "total")
    print(f"    step time ratio MORE / base, median of per-round ratios: {ratio:.2f}x (target <= 2.2x)")


def backward_profile(args: argparse.Namespace, device: torch.device, rows: int = 6) -> None:
    """Where a backward pass spends its time: the costliest operators of one backward per variant."""
    print(f"(d) one backward pass under torch.profiler, top {rows} operators by self time, grouped by input shapes")
    for more in (False, True):
        trainer = Trainer(args, more, device)
        for _ in range(args.warmup):
            trainer.step()
        trainer.method.train_mode(trainer.model)
        loss, _ = trainer.method.loss(trainer.model, trainer.x, trainer.y, PROGRESS)
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"    {'MORE' if more else 'base'}: {total:.1f} ms in all")
        for e in events[:rows]:
            print(f"      {e.key:34s}{e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count:<3d} {e.input_shapes}")


def child_memory(args: argparse.Namespace, device: torch.device) -> None:
    """Subprocess body: build one variant, train a few steps, print peak memory as JSON."""
    def status_mb(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB

    trainer = Trainer(args, args.child == "more", device)
    before = status_mb("VmRSS:") if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    for _ in range(args.warmup + 2):
        trainer.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # VmHWM is this process's own peak RSS. getrusage's ru_maxrss is not: Linux carries the parent's
        # peak into a child across fork/vfork + exec, so every variant would report the parent's size.
        peak = status_mb("VmHWM:")
    print(json.dumps({"peak_mb": peak, "before_mb": before}))


def peak_memory(args: argparse.Namespace) -> None:
    results = {}
    for variant in ("base", "more"):
        cmd = [sys.executable, __file__, "--child", variant, "--model", args.model,
               "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
               "--device", args.device, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    b, m = results["base"], results["more"]
    kind = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"(b) peak memory over {args.warmup + 2} training steps, each variant in its own subprocess ({kind}, MB;\n"
          "    training growth = peak - memory once the model is built)")
    print(f"    {'':20s}{'base':>10s}{'MORE':>10s}{'ratio':>10s}")
    print(f"    {'whole process':20s}{b['peak_mb']:10.0f}{m['peak_mb']:10.0f}{m['peak_mb'] / b['peak_mb']:9.2f}x")
    grow_b, grow_m = b["peak_mb"] - b["before_mb"], m["peak_mb"] - m["before_mb"]
    print(f"    {'training growth':20s}{grow_b:10.0f}{grow_m:10.0f}{grow_m / grow_b:9.2f}x")


def inference_time(args: argparse.Namespace, device: torch.device) -> None:
    base, _, _ = build(args, False, device)
    unmerged, _, _ = build(args, True, device)
    with torch.no_grad():
        for p in lowrank_parameters(unmerged):
            p.normal_(0, 0.01)  # a trained low-rank part, so the merge has something to fold
    merged, _, _ = build(args, True, device)
    merged.load_state_dict(unmerged.state_dict())
    merged = merge(merged)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    models = {"base": base.eval(), "merged": merged.eval(), "unmerged": unmerged.eval()}

    def timer(model: nn.Module) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                model(x)
                sync(device)
            return {"t": time.perf_counter() - start}
        return run

    runs = interleaved({k: timer(m) for k, m in models.items()}, args.warmup, args.repeats * 3)
    same = sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    print(f"(c) inference, eval mode, no_grad, batch {args.batch_size}: {args.repeats * 3} interleaved repeats (ms)")
    print(f"    {'':20s}{'median':>10s}{'ratio':>10s}   (ratio: median of per-round ratios to base)")
    for name, r in runs.items():
        print(f"    {name:20s}{median(r, 't') * 1e3:10.1f}{paired_ratio(r, runs['base'], 't'):9.2f}x")
    print(f"    merged model has the base parameter count: {same}")


def variant_time(args: argparse.Namespace, device: torch.device) -> None:
    trainers = {"base": Trainer(args, False, device), "MORE": Trainer(args, True, device)}
    trainers.update({name: Trainer(args, keys, device) for name, keys in VARIANTS.items()})
    runs = interleaved({name: t.step for name, t in trainers.items()}, args.warmup, args.repeats)
    print(f"(e) training step of each variant, median of {args.repeats} interleaved repeats (ms); ratios are medians "
          "of per-round ratios")
    print(f"    {'':28s}{'step':>10s}{'to base':>10s}{'to MORE':>10s}")
    for name, samples in runs.items():
        print(f"    {name:28s}{median(samples, 'total') * 1e3:10.1f}"
              f"{paired_ratio(samples, runs['base'], 'total'):10.2f}{paired_ratio(samples, runs['MORE'], 'total'):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--profile-backward", action="store_true", help="also (d): the backward's costliest operators")
    parser.add_argument("--variants", action="store_true", help="only (e): the step time of every MORE variant")
    parser.add_argument("--child", choices=["base", "more"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        child_memory(args, device)
        return
    print(f"MORE overhead: {args.model}, batch {args.batch_size} x 3 x 32 x 32 random, CE, {NUM_CLASSES} classes, "
          f"default MORE config (rank_ratio 0.1, l2, progress {PROGRESS}); torch {torch.__version__} on {device}, "
          f"{args.threads} threads")
    if args.variants:
        variant_time(args, device)
        return
    training_time(args, device)
    peak_memory(args)
    inference_time(args, device)
    if args.profile_backward:
        backward_profile(args, device)


if __name__ == "__main__":
    main()
