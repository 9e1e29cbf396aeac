"""Training and evaluation images/s: the tool against the bare model step, or the precision settings against fp32.

    python benchmarks/throughput.py [--rounds 8] [--batches 6] [k=v ...]
    python benchmarks/throughput.py --compare [--threads 1,2] [--rounds 5] [--batches 4] [--profile] [k=v ...]

Real CIFAR-10-LT (IF 100) from $LONGTAIL_DATA with ResNet-32 by default. "tool" is the engine's
`train_one_epoch` (sampler, on-device augmentation, method hook, scheduler, logging) and `collect_logits`;
"bare" is forward/backward/step (or forward) on the same batches already in memory and normalised. The
two alternate in short rounds of a few batches each, so the noise of a shared machine hits both alike;
the overhead is the median of the per-round ratios. Target: under 5 % on CPU.

`--compare`: fp32, bf16 autocast, bf16 + channels_last, bf16 + channels_last + torch.compile and fp32 +
torch.compile, each a run of its own through the engine's `train_one_epoch` (the method's loss, backward,
optimiser step) and `collect_logits` (evaluation, in bfloat16 for the bf16 settings as `--fast` evaluates, else
float32), round-robin over the settings
and the `--threads` counts (torch.set_num_threads) in one process after a warm-up round that compiles;
the median of the rounds. It prints the CPU model and its native bfloat16 instructions, each setting's
ratio to fp32 at each thread count, and the projected wall time of the config's whole recipe (epochs x
training images, plus an evaluation of the test split every `eval.every` epochs). `--profile` adds one
epoch of each setting split into data, augmentation, forward, backward, optimiser and evaluation.
`--tiny` is a seconds-long check of the pipeline (a BN-MLP on batches of 16), not a measurement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from longtail.config import load_config
from longtail.engine import build_loop, collect_logits, epoch_generator, eval_precision, setup, train_one_epoch
from longtail.progress import duration, set_quiet
from longtail.provenance import cpu_model, native_bf16


class FirstBatches:
    """The first `n` batches of a split's epoch: a round of the tool's own loops, unchanged otherwise."""

    def __init__(self, split, n: int):
        self.split, self.n = split, n

    def num_batches(self, *args, **kwargs) -> int:
        return self.n

    def batches(self, *args, **kwargs):
        return itertools.islice(self.split.batches(*args, **kwargs), self.n)

    def to_input(self, *args, **kwargs):
        return self.split.to_input(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.split)


def bare_train(model, method, optimizer, xs, ys) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in zip(xs, ys):
        loss = method.base_loss(model(x), y, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(y) for y in ys) / (time.perf_counter() - start)


@torch.no_grad()
def bare_eval(model, xs) -> float:
    model.eval()
    start = time.perf_counter()
    for x in xs:
        model(x)
    return sum(len(x) for x in xs) / (time.perf_counter() - start)


def tool_against_bare(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, ["train.epochs=1", "train.log_every=1000000", *args.overrides])
    run = setup(cfg, args.data_root)
    model, method, device, data = run.model, run.method, run.device, run.data
    train = FirstBatches(data.train, args.batches)
    test = FirstBatches(data.test, args.batches)

    # The bare step sees the same batches, already normalised on the device.
    batches = list(train.batches(cfg.data.batch_size, sampler="instance", seed=cfg.train.seed, epoch=0))
    xs = [data.train.to_input(x, device, train=False, generator=None) for x, _, _ in batches]
    ys = [y.to(device) for _, y, _ in batches]
    eval_xs = [data.test.to_input(x, device, train=False, generator=None)
               for x, _, _ in test.batches(cfg.eval.batch_size, sampler=None)]
    eval_images = sum(len(x) for x in eval_xs)

    rates: dict[str, list[float]] = {"tool train": [], "bare train": [], "tool eval": [], "bare eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        loop = build_loop(run, Path(tmp))
        for r in range(args.rounds):
            stats = train_one_epoch(loop, train, 0)
            rates["tool train"].append(stats["images_per_sec"])
            rates["bare train"].append(bare_train(model, method, loop.optimizer, xs, ys))
            start = time.perf_counter()
            collect_logits(model, test, device, cfg.eval.batch_size)
            rates["tool eval"].append(eval_images / (time.perf_counter() - start))
            rates["bare eval"].append(bare_eval(model, eval_xs))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)

    print(f"\n{cfg.model.name} on {data.name} (batches of {cfg.data.batch_size} from {len(data.train)} train images, "
          f"{cfg.eval.batch_size} from {len(data.test)} test images), {args.rounds} rounds of {args.batches} batches, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print("| phase | tool img/s (median) | bare img/s (median) | overhead (median of per-round bare/tool - 1) |")
    print("|---|---|---|---|")
    for phase in ("train", "eval"):
        tool, bare = rates[f"tool {phase}"], rates[f"bare {phase}"]
        overhead = statistics.median(b / t - 1 for t, b in zip(tool, bare))
        print(f"| {phase} | {statistics.median(tool):.0f} | {statistics.median(bare):.0f} | {100 * overhead:+.1f} % |")
    sys.stdout.flush()


# Each setting's keys, all set so that a config's own choice does not leak into another setting.
# The bf16 settings evaluate in bfloat16 too (eval.amp), as `--fast` (bf16+cl) does.
SETTINGS = {
    "fp32": ["train.amp=false", "train.channels_last=false", "train.compile=false", "eval.amp=false"],
    "bf16": ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=false", "train.compile=false",
             "eval.amp=true"],
    "bf16+cl": ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true", "train.compile=false",
                "eval.amp=true"],
    "bf16+cl+compile": ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true", "train.compile=true",
                        "eval.amp=true"],
    "fp32+compile": ["train.amp=false", "train.channels_last=false", "train.compile=true", "eval.amp=false"],
}
TINY = ["model.name=mlp", "model.width=32", "data.batch_size=16", "eval.batch_size=16"]
PHASES = ("data", "augmentation", "forward", "backward", "optimiser", "evaluation")


def len_of(split: FirstBatches, batch_size: int) -> int:
    """Images in the first `split.n` batches of `batch_size`."""
    return min(len(split), split.n * batch_size)


def profile_epoch(run, loop) -> dict[str, float]:
    """Seconds of one training epoch by phase, then of one evaluation of the test split. The engine's step taken
    apart (no accumulation, mixing or logging), timed phase by phase: on a CPU every operation is synchronous."""
    cfg, model, device, split = run.cfg, run.model, run.device, run.data.train
    seconds = dict.fromkeys(PHASES, 0.0)
    aug_gen = epoch_generator(cfg.train.seed, 0, purpose=1)
    amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
    # Full batches only: a compiled step would compile again for the last, smaller one (once per run, not per epoch).
    batches = iter(split.batches(cfg.data.batch_size, sampler=cfg.data.sampler, seed=cfg.train.seed, epoch=0,
                                 drop_last=True))
    run.method.train_mode(model)
    total = split.num_batches(cfg.data.batch_size, drop_last=True)
    for i in itertools.count():
        mark = time.perf_counter()
        item = next(batches, None)
        seconds["data"] += time.perf_counter() - mark
        if item is None:
            break
        x, y, _ = item
        mark = time.perf_counter()
        x = split.to_input(x, device, train=True, generator=aug_gen)
        if cfg.train.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        seconds["augmentation"] += time.perf_counter() - mark
        mark = time.perf_counter()
        loop.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.train.amp):
            loss, _ = loop.compiled_step(x, y.to(device), i / (cfg.train.epochs * total))
        seconds["forward"] += time.perf_counter() - mark
        mark = time.perf_counter()
        loss.backward()
        seconds["backward"] += time.perf_counter() - mark
        mark = time.perf_counter()
        loop.optimizer.step()
        loop.scheduler.step()
        loop.method.after_step(model)
        seconds["optimiser"] += time.perf_counter() - mark
    mark = time.perf_counter()
    collect_logits(model, run.data.test, device, cfg.eval.batch_size, **eval_precision(cfg))
    seconds["evaluation"] = time.perf_counter() - mark
    return seconds


def compare(args: argparse.Namespace) -> dict:
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, 2, torch.get_num_threads()})
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or "fp32" not in names:
        sys.exit(f"--settings {args.settings}: name fp32 (the baseline) and any of {', '.join(SETTINGS)}")
    base = ["train.log_every=1000000", *(TINY if args.tiny else []), *args.overrides]
    runs, loops = {}, {}
    tmp = tempfile.TemporaryDirectory()
    for name in names:
        runs[name] = setup(load_config(args.config, [*base, *SETTINGS[name]]), args.data_root)
        loops[name] = build_loop(runs[name], Path(tmp.name))
    cfg, data = runs["fp32"].cfg, runs["fp32"].data
    train_images = len_of(FirstBatches(data.train, args.batches), cfg.data.batch_size)
    rates = {t: {name: {"train": [], "eval": []} for name in names} for t in threads}
    for r in range(args.rounds + 1):  # round 0 warms up: torch.compile compiles there, oneDNN picks its kernels
        for t in threads:
            torch.set_num_threads(t)
            for name in names[r % len(names):] + names[:r % len(names)]:  # each setting starts a round in turn
                run = runs[name]
                train = train_one_epoch(loops[name], FirstBatches(run.data.train, args.batches), 0)["images_per_sec"]
                test = FirstBatches(run.data.test, args.eval_batches)
                start = time.perf_counter()
                collect_logits(run.model, test, run.device, run.cfg.eval.batch_size, **eval_precision(run.cfg))
                evaluated = len_of(test, run.cfg.eval.batch_size) / (time.perf_counter() - start)
                if r:
                    rates[t][name]["train"].append(train)
                    rates[t][name]["eval"].append(evaluated)
        if r:
            print(f"round {r}/{args.rounds} done", file=sys.stderr, flush=True)
    tmp.cleanup()

    epochs, every = cfg.train.epochs, cfg.eval.every
    evaluations = math.ceil(epochs / every)
    recipe_train, recipe_eval = epochs * len(data.train), evaluations * len(data.test)
    result = {"cpu": cpu_model(), "native_bf16": native_bf16(), "torch": str(torch.__version__),
              "model": cfg.model.name, "dataset": data.name, "batch_size": cfg.data.batch_size,
              "rounds": args.rounds, "train_images_per_round": train_images,
              "recipe": {"epochs": epochs, "train_images": len(data.train), "evaluations": evaluations,
                         "test_images": len(data.test)},
              "threads": {}}
    for t in threads:
        fp32 = statistics.median(rates[t]["fp32"]["train"])
        table = {}
        for name in names:
            train, evaluated = statistics.median(rates[t][name]["train"]), statistics.median(rates[t][name]["eval"])
            table[name] = {"train_img_s": train, "eval_img_s": evaluated, "ratio_to_fp32": train / fp32,
                           "recipe_s": recipe_train / train + recipe_eval / evaluated}
        result["threads"][str(t)] = table

    print(f"\nCPU: {result['cpu']}; native bfloat16: {result['native_bf16'] or 'none (bfloat16 is emulated)'}; "
          f"torch {result['torch']}")
    print(f"{cfg.model.name} on {data.name}, training batches of {cfg.data.batch_size} through the engine's step, "
          f"{args.rounds} interleaved rounds of {args.batches} batches (medians); evaluation in each setting's "
          f"precision (bf16: eval.amp), batches of {cfg.eval.batch_size}")
    print(f"recipe: {epochs} epochs x {len(data.train)} training images + {evaluations} evaluations x "
          f"{len(data.test)} test images\n")
    print("| threads | setting | train img/s | ratio to fp32 | eval img/s | recipe wall time |")
    print("|---|---|---|---|---|---|")
    for t, table in result["threads"].items():
        for name, row in table.items():
            print(f"| {t} | {name} | {row['train_img_s']:.0f} | x{row['ratio_to_fp32']:.2f} | {row['eval_img_s']:.0f} | "
                  f"{duration(row['recipe_s'])} |")

    if args.profile:
        torch.set_num_threads(threads[0])
        result["profile"] = {name: profile_epoch(runs[name], loops[name]) for name in names}
        print(f"\none epoch of {len(data.train)} training images and one evaluation of {len(data.test)} test images, "
              f"{threads[0]} thread(s), seconds (share):\n")
        print("| setting | " + " | ".join(PHASES) + " | total |")
        print("|---|" + "---|" * (len(PHASES) + 1))
        for name, seconds in result["profile"].items():
            total = sum(seconds.values())
            print(f"| {name} | " + " | ".join(f"{seconds[p]:.2f} ({100 * seconds[p] / total:.0f} %)" for p in PHASES)
                  + f" | {total:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs/cifar10_lt/ce.yaml"))
    parser.add_argument("--data-root", help="dataset directory (default: data.root, $LONGTAIL_DATA)")
    parser.add_argument("--compare", action="store_true", help="the precision settings side by side (above)")
    parser.add_argument("--threads", help="--compare: torch thread counts, comma-separated (default: 1, 2 and the "
                        "current count)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="--compare: which settings, comma-separated "
                        "(cl: channels_last; fp32 is the baseline)")
    parser.add_argument("--profile", action="store_true", help="--compare: also one epoch of each setting by phase")
    parser.add_argument("--tiny", action="store_true", help="--compare: a BN-MLP on batches of 16, one round")
    parser.add_argument("--json", help="--compare: also write the numbers to this file")
    parser.add_argument("--rounds", type=int, help="measured rounds (default: 8, --compare 5, --tiny 1)")
    parser.add_argument("--batches", type=int, help="training batches per round and side (default: 6, --compare 4, "
                        "--tiny 1)")
    parser.add_argument("--eval-batches", type=int, default=4, help="--compare: evaluation batches per round")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    set_quiet(True)  # no progress bars between the rounds
    if not args.compare:
        args.rounds, args.batches = args.rounds or 8, args.batches or 6
        tool_against_bare(args)
        return
    quick = 1 if args.tiny else None
    args.rounds, args.batches = args.rounds or quick or 5, args.batches or quick or 4
    if args.tiny:
        args.eval_batches = 1
    compare(args)


if __name__ == "__main__":
    main()
