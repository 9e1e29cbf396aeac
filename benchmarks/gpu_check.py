"""One command that checks the engine on a GPU: every method family, resume, MORE's merge, NCCL, speed.

    PYTHONPATH=. python benchmarks/gpu_check.py [--data-root DIR]     # from a clone, nothing to install
    python benchmarks/gpu_check.py --device cpu --tiny               # the same code path on tiny fake data

Without CUDA (and without --device cpu) it prints one line saying it skipped and exits 0. Otherwise:

1. families: one short epoch of CE, LDAM-DRW (two epochs, DRW from the second), WB stage 2 on cached
   features (stage 1 = the CE run), EWB (best val epoch, post-hoc logit adjustment searched on val),
   MiSLAS stage 1 with AutoAugment, Cutout and CutMix added (the batched policy ops and label mixing on
   the device) and CE + MORE (merged export), each a real `longtail.engine.fit` of a
   configs/cifar10_lt/*.yaml config, with train.amp=true and train.channels_last=true on CUDA;
2. MORE: the exported (merged) model.pt, loaded with `load_run`, gives the unmerged model's test logits;
3. resume: with deterministic algorithms, a 2-epoch run equals the same run killed after its epoch-1
   checkpoint and resumed, and the same run stopped by SIGTERM in the middle of epoch 2 and resumed;
4. collectives: a 1-process NCCL group (gloo on CPU) through the helpers of longtail.distributed and
   metrics.gather_unique, past their world-size-1 short-circuits, then a whole DDP-wrapped fit;
5. speed: tool against bare training step (alternating rounds, as benchmarks/throughput.py), the gain
   of each speed option side by side, and the projected wall time of the 200-epoch CE recipe.

Data: CIFAR-10-LT from --data-root / $LONGTAIL_DATA / ~/.cache/longtail-data when one holds
cifar-10-batches-py/, else synthetic images in the CIFAR-10 file format at full size (accuracies then
mean nothing; timings do). Exit status 1 when a check failed; the speed goals never fail the run.
"""
from __future__ import annotations

import os

# cuBLAS reads this when it creates its handle (first CUDA matmul): it must be set before anything runs
# on the GPU for deterministic algorithms to be allowed at all.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/throughput.py, also when longtail is pip-installed

from throughput import FirstBatches, bare_eval, bare_train  # noqa: E402

from longtail import distributed as ltdist  # noqa: E402
from longtail import engine  # noqa: E402
from longtail.checkpoint import load_checkpoint  # noqa: E402
from longtail.config import load_config  # noqa: E402
from longtail.methods import register_method  # noqa: E402
from longtail.methods.base import Method  # noqa: E402
from longtail.metrics import gather_unique  # noqa: E402

CONFIGS = REPO / "configs" / "cifar10_lt"
# --tiny: a BN-MLP on ~200 fake images instead of ResNet-32 on 12,406 (CPU seconds instead of GPU seconds).
TINY = ["data.imbalance=5", "data.batch_size=16", "eval.batch_size=64", "model.name=mlp", "model.width=32"]
GOAL_RATIO = 0.95  # tool / bare training throughput
GOAL_SECONDS = 120.0  # the 200-epoch CIFAR-10-LT recipe on one H100/H200-class GPU (~6 ms x ~19,400 steps)
MERGE_TOL = dict(rtol=1e-5, atol=1e-5)  # float32, TF32 off (what tests/test_more.py uses)


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class Check:
    name: str
    status: str  # ok | identical | within tolerance | skipped | failed | differs
    seconds: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "identical", "within tolerance", "skipped")


class Ctx:
    """What every section shares: device, data root, work directory, time budget, the results so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, data_root: str, data_kind: str, work: Path):
        self.args, self.device, self.data_root, self.data_kind, self.work = args, device, data_root, data_kind, work
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.checks: list[Check] = []
        self.runs: dict[str, Path] = {}
        self.results: dict[str, dict] = {}
        self.perf: list[dict] = []
        self.notes: list[str] = []
        self.strict_determinism = True  # whether the resume check ran with use_deterministic_algorithms strict

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def common(self) -> list[str]:
        """Overrides every run gets: the device, AMP and channels_last on CUDA, tiny sizes with --tiny."""
        over = [f"train.device={'cuda:0' if self.cuda else 'cpu'}"]
        if self.cuda:
            over += ["train.amp=true", "train.channels_last=true"]
        return over + (TINY if self.args.tiny else [])

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"  {check.name}: {check.status} ({check.seconds:.1f} s) {check.detail}", flush=True)
        return check


def say(text: str) -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet(log: Path):
    """The engine's epoch lines, result tables and progress bars go to a log file, not the report."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def failure(exc: BaseException, log: Optional[Path] = None) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:240]
    return f"{type(exc).__name__}: {first}" + (f" (log: {log})" if log else "")


def config(ctx: Ctx, name: str, extra: list[str] = ()) -> Any:
    return load_config(CONFIGS / name, [*ctx.common(), *extra])


def run_fit(ctx: Ctx, key: str, cfg: Any, resume: bool = False) -> dict:
    out = ctx.work / "runs" / key
    with quiet(ctx.work / "logs" / f"{key}.log"):
        results = engine.fit(cfg, out, resume=resume, data_root=ctx.data_root)
    ctx.runs[key] = out
    return results


def reset_backends() -> None:
    """What one fit leaves set globally, back to torch's defaults."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- data


def fake_data_module() -> Any:
    """tests/fake_data.py (the writers of the real on-disk formats), imported by path."""
    path = REPO / "tests" / "fake_data.py"
    spec = importlib.util.spec_from_file_location("longtail_gpu_check_fake_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def choose_data(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(data root, what it is): real CIFAR-10 when found, else fake files in the same format."""
    if not args.tiny:
        for root in (args.data_root, os.environ.get("LONGTAIL_DATA"), "~/.cache/longtail-data"):
            if root and (Path(root).expanduser() / "cifar-10-batches-py").is_dir():
                return str(Path(root).expanduser()), f"CIFAR-10-LT from {Path(root).expanduser()}"
    root = work / "data"
    if args.tiny:
        fake_data_module().write_cifar10(root, train_per_class=40, test_per_class=10)
        return str(root), "tiny fake CIFAR-10 (40 train / 10 test images per class, imbalance 5)"
    fake_data_module().write_cifar10(root, train_per_class=5000, test_per_class=1000)
    return str(root), ("synthetic CIFAR-10 at full size (no cifar-10-batches-py under --data-root, $LONGTAIL_DATA "
                       "or ~/.cache/longtail-data): accuracies mean nothing, timings do")


# ----------------------------------------------------------------------------- 1. families


# (run key, name, config, overrides)
FAMILIES = [
    ("CE", "CE", "ce.yaml", ["train.epochs=1"]),
    # drw_start is resolved to whole epochs: with one epoch DRW would never start, so two, DRW from the second.
    ("LDAM", "LDAM-DRW", "ldam_drw.yaml", ["train.epochs=2", "loss.drw_start=1"]),
    ("WB", "WB stage 2 (cached features)", "wb_stage2.yaml",
     ["train.epochs=1", "data.augment=none", "method.cache_features=true"]),
    ("EWB", "EWB + post-hoc LA", "ewb.yaml", ["train.epochs=1"]),
    ("AUG", "mixup + CutMix + AutoAugment + Cutout", "mislas_stage1_mixup.yaml",
     ["train.epochs=1", "data.policy=autoaugment_cifar", "data.cutout=16", "data.cutmix_alpha=1.0"]),
    # MORE stays last (check_more_merge reuses its overrides).
    # One epoch squeezes MORE's whole alpha = A sin(pi t / T) into it (the recipe's first epoch sees alpha
    # <= 0.3, this one a peak of A = 2 x 10 classes = 20), and MORE at lr 0.1 diverges in short runs without
    # an epoch of warm-up (docs/methods/more.md): warm up all of it, peak alpha 2.
    ("MORE", "CE + MORE (merged export)", "ce_more.yaml",
     ["train.epochs=1", "schedule.warmup_epochs=1", "more.amplitude=0.2"]),
]


def family_overrides(ctx: Ctx, key: str, extra: list[str]) -> list[str]:
    extra = list(extra)
    if key == "WB":  # stage 1 is the CE run
        extra.append(f"method.init_from={ctx.work / 'runs' / 'CE'}")
    if key == "EWB" and ctx.args.tiny:
        extra.append("data.val_per_class=2")  # 20 per class would empty the tiny tail classes
    return extra


def check_families(ctx: Ctx) -> None:
    say("families (one short fit each" + (", train.amp=true train.channels_last=true" if ctx.cuda else "") + "):")
    for key, name, file, extra in FAMILIES:
        start = time.perf_counter()
        try:
            cfg = config(ctx, file, family_overrides(ctx, key, extra))
            results = run_fit(ctx, key, cfg)
            ctx.results[key] = results
            if not all(math.isfinite(results[k]) for k in ("top1", "nll")):
                # A loss can grow huge without becoming inf or NaN: the engine's non-finite stop never fires,
                # and the test logits overflow.
                raise AssertionError(f"the run finished but its test NLL is {results['nll']} (logits not finite; "
                                     f"mean train loss of the last epoch {last_loss(ctx.runs[key]):.3g})")
            detail = (f"test top1 {results['top1']:.2f} %, balanced {results['balanced']:.2f} % after "
                      f"{cfg.train.epochs} epoch(s)")
            if results.get("posthoc"):
                detail += f", post-hoc {results['posthoc']['kind']} tau {results['posthoc']['tau']}"
            if cfg.eval.select != "final":
                detail += f", {cfg.eval.select} epoch {results['epoch']}"
            ctx.add(Check(name, "ok", time.perf_counter() - start, detail))
        except Exception as exc:  # a family that fails must not hide the others
            ctx.add(Check(name, "failed", time.perf_counter() - start, failure(exc, ctx.work / "logs" / f"{key}.log")))
        finally:
            reset_backends()


def last_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]


# ----------------------------------------------------------------------------- 2. MORE merge


@contextlib.contextmanager
def full_float32():
    """TF32 off: float32 tolerance compares float32 arithmetic, not TF32's 10-bit mantissa."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_more_merge(ctx: Ctx) -> None:
    name = "MORE merged vs unmerged logits"
    start = time.perf_counter()
    if "MORE" not in ctx.results:
        ctx.add(Check(name, "failed", 0.0, "the CE + MORE run did not finish"))
        return
    out = ctx.runs["MORE"]
    try:
        with full_float32(), quiet(ctx.work / "logs" / "more-merge.log"):
            # The trained, still decomposed model: checkpoint.pt of the last epoch (eval.select final).
            # Rebuilt contiguous (channels_last=false), as the exported model loads.
            cfg = config(ctx, "ce_more.yaml", [*FAMILIES[-1][3], "train.channels_last=false"])
            run = engine.setup(cfg, ctx.data_root)
            run.model.load_state_dict(load_checkpoint(out / "checkpoint.pt", map_location=ctx.device)["model"])
            unmerged, targets = engine.collect_logits(run.model, run.data.test, ctx.device, cfg.eval.batch_size)
            loaded = engine.load_run(out, ctx.data_root)
            lowrank = [k for k in loaded.model.state_dict() if k.endswith((".A", ".B")) or "parametrizations" in k]
            merged, _ = engine.collect_logits(loaded.model.to(ctx.device), loaded.data.test, ctx.device,
                                              cfg.eval.batch_size)
        diff = float((merged - unmerged).abs().max())
        tol = f"rtol {MERGE_TOL['rtol']:g}, atol {MERGE_TOL['atol']:g}, TF32 off"
        if not torch.allclose(merged, unmerged, **MERGE_TOL):
            raise AssertionError(f"max |diff| {diff:.3g} over {merged.numel()} logits, beyond {tol}")
        if lowrank:
            raise AssertionError(f"model.pt still holds low-rank parts: {lowrank[:3]}")
        # results.json was evaluated with TF32 allowed (torch's default for cuDNN): a near-tie may flip there.
        top1, reported = float((merged.argmax(1) == targets).double().mean()) * 100, ctx.results["MORE"]["top1"]
        if abs(top1 - reported) > (0.2 if ctx.cuda else 1e-6):
            raise AssertionError(f"merged model's top1 {top1:.4f} != results.json {reported:.4f}")
        ctx.add(Check(name, "ok", time.perf_counter() - start,
                      f"max |diff| {diff:.2e} over {merged.numel()} logits ({tol}); model.pt is the plain "
                      f"architecture; top1 {top1:.2f} % (results.json {reported:.2f} %)"))
    except Exception as exc:
        ctx.add(Check(name, "failed", time.perf_counter() - start, failure(exc, ctx.work / "logs" / "more-merge.log")))
    finally:
        reset_backends()


# ----------------------------------------------------------------------------- 3. resume


class SimulatedKill(Exception):
    """A hard kill (SIGKILL, a lost node) right after a checkpoint: nothing after it was saved."""


class StopAt(Method):
    """ERM that interrupts its own run before its `at`-th training forward: a stop signal, as a scheduler
    sends it (the engine checkpoints mid-epoch and raises Preempted), or a simulated kill."""

    calls, at, how = 0, 0, "signal"

    def loss(self, model, x, y, progress):
        StopAt.calls += 1
        if StopAt.calls == StopAt.at:
            if StopAt.how == "kill":
                raise SimulatedKill(f"killed before forward {StopAt.at}")
            os.kill(os.getpid(), engine.stop_signals()[0])
        return super().loss(model, x, y, progress)


register_method("gpu_check_stop", f"{__name__}:StopAt")


def resume_config(ctx: Ctx) -> Any:
    return config(ctx, "ce.yaml", ["train.epochs=2", "method.name=gpu_check_stop"])


def compare_runs(a: Path, b: Path) -> tuple[bool, float, str]:
    """(model.pt and metrics.jsonl identical, max |weight difference|, what differs)."""
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    if wa.keys() != wb.keys():
        return False, float("inf"), "model.pt keys differ"
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0 for k in wa)
    same_weights = all(torch.equal(wa[k], wb[k]) for k in wa)
    timing = ("images_per_sec", "epoch_seconds")
    records = [[{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    what = [] if same_weights else [f"weights (max |diff| {diff:.2e})"]
    if records[0] != records[1]:
        what.append("metrics.jsonl")
    return not what, diff, ", ".join(what)


def interrupted_run(ctx: Ctx, key: str, how: str, at: int) -> Path:
    """Run until StopAt interrupts at forward `at`, then resume with the same command (--resume)."""
    StopAt.calls, StopAt.at, StopAt.how = 0, at, how
    expected = SimulatedKill if how == "kill" else engine.Preempted
    try:
        run_fit(ctx, key, resume_config(ctx))
        raise AssertionError(f"the run was not interrupted at forward {at}")
    except expected:
        pass
    state = load_checkpoint(ctx.work / "runs" / key / "checkpoint.pt")
    where = (f"mid-epoch checkpoint (epoch {state['partial']['epoch'] + 1}, batch {state['partial']['batch']})"
             if "partial" in state else f"epoch-{state['epoch'] + 1} checkpoint")
    ctx.notes.append(f"resume ({how}): stopped at forward {at}, resumed from the {where}")
    StopAt.calls, StopAt.at = 0, 0
    run_fit(ctx, key, resume_config(ctx), resume=True)
    return ctx.work / "runs" / key


RESUME_CHECKS = ("resume: kill after the epoch-1 checkpoint", "resume: SIGTERM mid-epoch 2")


def check_resume(ctx: Ctx) -> None:
    say("resume (torch.use_deterministic_algorithms(True), cudnn.benchmark off"
        + (f", CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}" if ctx.cuda else "") + "):")
    start = time.perf_counter()
    reference, error, strict = None, None, True
    for strict in (True, False):
        torch.use_deterministic_algorithms(True, warn_only=not strict)
        torch.backends.cudnn.benchmark = False
        shutil.rmtree(ctx.work / "runs" / "resume-reference", ignore_errors=True)
        StopAt.calls, StopAt.at = 0, 0
        try:
            run_fit(ctx, "resume-reference", resume_config(ctx))
            reference = ctx.runs["resume-reference"]
            break
        except Exception as exc:
            error = exc
            if strict and isinstance(exc, RuntimeError) and "determinis" in str(exc):
                ctx.notes.append(f"resume: deterministic algorithms refused an op ({failure(exc)}); compared "
                                 "with warn_only=True and a tolerance of 1e-3 on the weights")
                continue
            break
    if reference is None:
        for name in RESUME_CHECKS:
            ctx.add(Check(name, "failed", time.perf_counter() - start, "the uninterrupted run: "
                          + failure(error, ctx.work / "logs" / "resume-reference.log")))
        reset_backends()
        return
    ctx.results["resume-reference"] = json.loads((reference / "results.json").read_text())
    forwards = StopAt.calls // 2  # training forwards per epoch: the reference ran two epochs
    variants = [(RESUME_CHECKS[0], "resume-kill", "kill", forwards + 1),
                (RESUME_CHECKS[1], "resume-signal", "signal", forwards + max(1, forwards // 3))]
    if not engine.stop_signals():
        variants = variants[:1]
        ctx.notes.append("resume: LONGTAIL_STOP_SIGNALS names no signal; the stop-signal variant was not run")
    for name, key, how, at in variants:
        begin = time.perf_counter()
        try:
            run = interrupted_run(ctx, key, how, at)
            same, diff, what = compare_runs(run, reference)
            if same:
                ctx.add(Check(name, "identical", time.perf_counter() - begin,
                              "model.pt and metrics.jsonl equal the uninterrupted 2-epoch run bit for bit"))
            elif not strict and diff <= 1e-3:
                ctx.add(Check(name, "within tolerance", time.perf_counter() - begin,
                              f"max |weight diff| {diff:.2e} <= 1e-3 (a non-deterministic op ran; {what} differ)"))
            else:
                ctx.add(Check(name, "differs", time.perf_counter() - begin, f"from the uninterrupted run: {what}"))
        except Exception as exc:
            ctx.add(Check(name, "failed", time.perf_counter() - begin, failure(exc, ctx.work / "logs" / f"{key}.log")))
    ctx.strict_determinism = strict
    reset_backends()


# ----------------------------------------------------------------------------- 4. collectives


def _is_one(other: Any) -> bool:
    return type(other) is int and other == 1


class ManyRanks(int):
    """The number 1 that compares as more than one process: the helpers' `world_size() == 1` and
    `> 1` short-circuits take their multi-process branch, while list lengths, `range` and divisions
    still use 1, the size of the real process group. So a 1-process group runs every collective."""

    def __new__(cls) -> "ManyRanks":
        return super().__new__(cls, 1)

    def __eq__(self, other: Any) -> Any:
        return False if _is_one(other) else int.__eq__(self, other)

    def __ne__(self, other: Any) -> Any:
        return True if _is_one(other) else int.__ne__(self, other)

    def __gt__(self, other: Any) -> Any:
        return True if _is_one(other) else int.__gt__(self, other)

    def __ge__(self, other: Any) -> Any:
        return True if _is_one(other) else int.__ge__(self, other)

    def __lt__(self, other: Any) -> Any:
        return False if _is_one(other) else int.__lt__(self, other)

    def __le__(self, other: Any) -> Any:
        return False if _is_one(other) else int.__le__(self, other)

    __hash__ = int.__hash__


@contextlib.contextmanager
def forced_multi_rank():
    saved = ltdist.world_size
    ltdist.world_size = ManyRanks  # longtail.engine and longtail.metrics call it through the module
    try:
        yield
    finally:
        ltdist.world_size = saved


def collective_problems(ctx: Ctx) -> tuple[list[str], list[str]]:
    """(what was checked, what went wrong) for every helper of longtail.distributed and gather_unique,
    each called past its world-size-1 short-circuit so that it really communicates."""
    import torch.distributed as tdist

    covered, problems = [], []

    def probe(what: str, fn: Callable[[], bool]) -> None:
        covered.append(what)
        try:
            if not fn():
                problems.append(f"{what}: wrong result")
        except Exception as exc:
            problems.append(f"{what}: {failure(exc)}")

    def raw_all_gather() -> bool:
        t = torch.arange(6, dtype=torch.float32, device=ltdist.comm_device())
        parts = [torch.empty_like(t)]
        tdist.all_gather(parts, t)
        return torch.equal(parts[0], t)

    def rows_back(rows: torch.Tensor) -> bool:
        got = ltdist.all_gather_rows(rows)
        return got.device == rows.device and got.dtype == rows.dtype and torch.equal(got, rows)

    def unique() -> bool:
        logits, targets = torch.randn(7, 4), torch.randint(0, 4, (7,))
        idx = torch.tensor([3, 1, 3, 0, 2, 1, 4])  # padded positions repeat, as distributed samplers pad
        first = [3, 1, 4, 0, 6]  # where positions 0..4 first occur
        lg, tg, ix = gather_unique(logits, targets, idx)
        return ix.tolist() == [0, 1, 2, 3, 4] and torch.equal(lg, logits[first]) and torch.equal(tg, targets[first])

    def bn_stats() -> bool:
        bn = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(3)).to(ctx.device)
        for m in bn:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        ltdist.average_bn_stats(bn)
        return all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())

    cuda_rows = torch.arange(7, device=ctx.device)
    probe(f"comm_device() is {ctx.device.type} for {tdist.get_backend_config()!r}",
          lambda: ltdist.comm_device().type == ctx.device.type)
    probe("torch.distributed.all_gather", raw_all_gather)
    with forced_multi_rank():
        probe("all_gather_rows (float32 rows on the CPU)", lambda: rows_back(torch.randn(5, 3)))
        probe(f"all_gather_rows (int64 on {ctx.device.type})", lambda: rows_back(cuda_rows))
        x = torch.tensor([1.5, -2.0], dtype=torch.float64)
        probe("all_reduce sum (float64 on the CPU)", lambda: torch.equal(ltdist.all_reduce(x), x))
        flags = torch.tensor([0.0, 1.0], device=ctx.device)
        probe(f"all_reduce max (on {ctx.device.type})", lambda: torch.equal(ltdist.all_reduce(flags, op="max"), flags))
        probe("gather_unique (repeats dropped, sorted by position)", unique)
        probe("all_gather_object", lambda: ltdist.all_gather_object({"a": [1, 2]}) == [{"a": [1, 2]}])
        probe("mean_over_ranks", lambda: ltdist.mean_over_ranks({"loss": 1.25, "acc": 0.5}) == {"loss": 1.25, "acc": 0.5})
        probe("average_bn_stats", bn_stats)
        probe("barrier", lambda: ltdist.barrier() is None)
    return covered, problems


def check_collectives(ctx: Ctx) -> None:
    import torch.distributed as tdist

    backend = "nccl" if ctx.cuda else "gloo"
    say(f"collectives (one process, backend {backend}" + ("" if ctx.cuda else "; NCCL needs CUDA") + "):")
    names = (f"collectives ({backend}, world 1)", f"DDP fit ({backend}, world 1)")
    start = time.perf_counter()
    if tdist.is_initialized():
        for name in names:
            ctx.add(Check(name, "failed", 0.0, "a process group already exists in this process"))
        return
    try:
        if ctx.cuda:
            torch.cuda.set_device(ctx.device)
        tdist.init_process_group(backend, init_method=(ctx.work / "pg-store").resolve().as_uri(), rank=0,
                                 world_size=1, timeout=timedelta(seconds=120))
    except Exception as exc:
        for name in names:
            ctx.add(Check(name, "failed", time.perf_counter() - start, "init_process_group: " + failure(exc)))
        return
    try:
        try:
            covered, problems = collective_problems(ctx)
            ctx.add(Check(names[0], "failed" if problems else "ok", time.perf_counter() - start,
                          ("wrong: " + "; ".join(problems) + ". ") * bool(problems)
                          + f"{len(covered)} checks past the world-size-1 short-circuits: " + ", ".join(covered)))
        except Exception as exc:
            ctx.add(Check(names[0], "failed", time.perf_counter() - start, failure(exc)))
        # The whole multi-process code path of fit on one rank: DDP-wrapped step, flags all-reduced, BN
        # averaging, metric means, gathered evaluation, barriers. Same run as the resume reference.
        begin = time.perf_counter()
        try:
            torch.use_deterministic_algorithms(True, warn_only=not ctx.strict_determinism)
            StopAt.calls, StopAt.at = 0, 0
            with forced_multi_rank():
                results = run_fit(ctx, "ddp", resume_config(ctx))
            detail = (f"DistributedDataParallel step, flag all-reduce, BN averaging, gathered evaluation of "
                      f"{results['num_samples']} test images; test top1 {results['top1']:.2f} %")
            reference = ctx.runs.get("resume-reference")
            status = "ok"
            if reference is None:
                detail += "; no single-process reference to compare with"
            else:
                same, diff, what = compare_runs(ctx.runs["ddp"], reference)
                if same:
                    detail += "; equal to the single-process run bit for bit"
                else:
                    status = "differs"
                    detail += f"; differs from the single-process run: {what}"
                if results["num_samples"] != ctx.results["resume-reference"]["num_samples"]:
                    status = "failed"
                    detail += f" (single process evaluated {ctx.results['resume-reference']['num_samples']})"
            ctx.add(Check(names[1], status, time.perf_counter() - begin, detail))
        except Exception as exc:
            ctx.add(Check(names[1], "failed", time.perf_counter() - begin, failure(exc, ctx.work / "logs" / "ddp.log")))
    finally:
        tdist.destroy_process_group()
        reset_backends()


# ----------------------------------------------------------------------------- 5. speed


# (key, what it is, overrides on top of ce.yaml with data on the device, needs CUDA)
VARIANTS = [
    ("base", "defaults (float32, data on the device)", [], False),
    ("off_device", "data.on_device=false", ["data.on_device=false"], False),
    ("cudnn", "train.cudnn_benchmark=true", ["train.cudnn_benchmark=true"], True),
    ("fp16", "train.amp=true, amp_dtype float16", ["train.amp=true", "train.amp_dtype=float16"], True),
    ("bf16", "train.amp=true, amp_dtype bfloat16", ["train.amp=true", "train.amp_dtype=bfloat16"], True),
    ("cl", "train.channels_last=true", ["train.channels_last=true"], True),
    ("fast", "amp bfloat16 + channels_last + cudnn_benchmark",
     ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true", "train.cudnn_benchmark=true"], True),
    ("fast_compile", "the fast set + train.compile=true",
     ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true", "train.cudnn_benchmark=true",
      "train.compile=true"], True),
]
# (row, variant, against): each option measured side by side with the config it changes
GAINS = [
    ("gain: train.compile (on the fast set)", "fast_compile", "fast"),
    ("gain: train.cudnn_benchmark", "cudnn", "base"),
    ("gain: train.amp float16", "fp16", "base"),
    ("gain: train.amp bfloat16", "bf16", "base"),
    ("gain: data.on_device true vs false", "base", "off_device"),
    ("gain: train.channels_last (float32)", "cl", "base"),
    ("gain: fast set (amp bf16 + channels_last + cudnn_benchmark)", "fast", "base"),
]
BARE = ("base", "fast")  # the variants whose bare step is timed too


@dataclass
class Variant:
    key: str
    label: str
    cfg: Any
    loop: Any
    run: Any
    train: Any  # FirstBatches of the training split
    images: int  # images per round
    xs: list
    ys: list
    tool: list
    bare: list
    warmup_s: float = 0.0


def build_loop(cfg: Any, data_root: str, out: Path) -> tuple[Any, Any]:
    """What `fit` builds before its first epoch (engine.Loop), without a run directory."""
    run = engine.setup(cfg, data_root)
    run.method.train_mode(run.model)
    out.mkdir(parents=True, exist_ok=True)
    return engine.build_loop(run, out), run


def _amp(cfg: Any, device: torch.device):
    dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=cfg.train.amp and device.type == "cuda")


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds of `fn` with the device idle before and finished after (the CPU may not run ahead)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def tool_round(ctx: Ctx, v: Variant, batches: Optional[int] = None) -> float:
    """Images/s of the engine's own epoch loop over the round's batches (or the first `batches`)."""
    torch.backends.cudnn.benchmark = ctx.cuda and v.cfg.train.cudnn_benchmark  # fit sets it per run
    split = v.train if batches is None else FirstBatches(v.train.split, batches)
    with quiet(ctx.work / "logs" / "speed.log"):
        seconds = timed(ctx.device, lambda: engine.train_one_epoch(v.loop, split, 0))
    return split.n * v.cfg.data.batch_size / seconds


def bare_round(ctx: Ctx, v: Variant) -> float:
    torch.backends.cudnn.benchmark = ctx.cuda and v.cfg.train.cudnn_benchmark
    model, method, optimizer = v.loop.model, v.loop.method, v.loop.optimizer
    with _amp(v.cfg, ctx.device):  # the fast set's bfloat16 needs no gradient scaler
        seconds = timed(ctx.device, lambda: bare_train(model, method, optimizer, v.xs, v.ys))
    return v.images / seconds


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios: the noise of a shared machine hits both sides of a round alike."""
    return statistics.median(x / y for x, y in zip(a, b))


def profile_steps(ctx: Ctx, fn: Callable[[], Any], steps: int) -> dict:
    """Per step: GPU kernel time, kernel launches, host syncs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(ctx.device)
    gpu_us, launches, syncs, copies, kernels = 0.0, 0, 0, 0, {}
    for e in prof.events():
        name = e.name
        if "CUDA" in str(getattr(e, "device_type", "")):
            us = e.time_range.elapsed_us()
            gpu_us += us
            kernels[name] = kernels.get(name, 0.0) + us
        elif "LaunchKernel" in name:
            launches += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
        elif name.startswith("cudaMemcpy"):
            copies += 1
    syncs = max(0, syncs - ctx.cuda)  # the one after fn, to collect every kernel
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:3]
    return {"gpu_ms": gpu_us / 1000 / steps if ctx.cuda else None, "launches": launches / steps,
            "syncs": syncs / steps, "copies": copies / steps,
            "top_kernels": [(n[:60], round(us / 1000 / steps, 3)) for n, us in top]}


def measure_speed(ctx: Ctx) -> None:
    args = ctx.args
    say(f"speed ({args.rounds} alternating rounds of {args.batches} batches per variant):")
    device = ctx.device
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    setup_s = None
    for key, label, over, needs_cuda in VARIANTS:
        if "train.compile=true" in over:
            if args.no_compile:
                skipped[key] = "skipped (--no-compile)"
                continue
            if not ctx.cuda and not args.compile:
                skipped[key] = ("skipped on the CPU: inductor builds C++ kernels for about a minute, over the "
                                "budget of a smoke run (--compile measures it)")
                continue
            if ctx.left() < 150:
                skipped[key] = f"skipped: {ctx.left():.0f} s of the {args.budget:.0f} s budget left, compiling takes ~1 min"
                continue
            if not ctx.cuda:
                over = ["train.compile=true"]  # the fast set is this check's GPU rows; on a CPU compile float32 alone
        elif needs_cuda and not ctx.cuda:
            # bfloat16 and channels_last do apply on a CPU: benchmarks/throughput.py --compare measures them there.
            skipped[key] = "skipped: needs CUDA (a GPU setting here; a CPU's: benchmarks/throughput.py --compare)"
            continue
        cfg = load_config(CONFIGS / "ce.yaml", [f"train.device={'cuda:0' if ctx.cuda else 'cpu'}",
                                                *(TINY if args.tiny else []), "data.on_device=true", *over])
        begin = time.perf_counter()
        with quiet(ctx.work / "logs" / "speed.log"):
            loop, run = build_loop(cfg, ctx.data_root, ctx.work / "speed" / key)
        if key == "base":
            setup_s = time.perf_counter() - begin
        split = loop.method.train_split(run.data.train, loop.model)
        n = max(1, min(args.batches, len(split) // cfg.data.batch_size))
        train = FirstBatches(split, n)
        xs, ys = [], []
        if key in BARE:
            batches = list(train.batches(cfg.data.batch_size, sampler="instance", seed=cfg.train.seed, epoch=0))
            xs = [split.to_input(x, device, train=False, generator=None) for x, _, _ in batches]
            if cfg.train.channels_last and ctx.cuda:
                xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            ys = [y.to(device) for _, y, _ in batches]
        variants[key] = Variant(key, label, cfg, loop, run, train, n * cfg.data.batch_size, xs, ys, [], [])

    # Warm-up (compilation, cuDNN autotuning, allocator), then rounds in alternating order.
    for v in variants.values():
        start = time.perf_counter()
        tool_round(ctx, v)
        if v.key in BARE:
            bare_round(ctx, v)
        v.warmup_s = time.perf_counter() - start
    base = variants["base"]
    test = base.run.data.test
    n_eval = max(1, min(args.batches, len(test) // base.cfg.eval.batch_size))
    eval_split = FirstBatches(test, n_eval)
    eval_xs = [test.to_input(x, device, train=False, generator=None)
               for x, _, _ in eval_split.batches(base.cfg.eval.batch_size, sampler=None)]
    eval_images = sum(len(x) for x in eval_xs)
    tool_eval, bare_eval_rates = [], []
    order = list(variants.values())
    for r in range(args.rounds):
        for v in order if r % 2 == 0 else order[::-1]:
            v.tool.append(tool_round(ctx, v))
            if v.key in BARE:
                v.bare.append(bare_round(ctx, v))
        torch.backends.cudnn.benchmark = False  # as base trains
        tool_eval.append(eval_images / timed(device, lambda: engine.collect_logits(
            base.loop.model, eval_split, device, base.cfg.eval.batch_size)))
        bare_eval_rates.append(eval_images / timed(device, lambda: bare_eval(base.loop.model, eval_xs)))
    reset_backends()

    def step_ms(v: Variant, rates: Optional[list] = None) -> float:
        return 1000 * v.cfg.data.batch_size / statistics.median(rates if rates is not None else v.tool)

    rows = ctx.perf
    for key, label in (("base", "defaults, float32"), ("fast", "fast set")):
        row = f"tool/bare train ({label})"
        if key not in variants:
            rows.append({"row": row, "value": skipped.get(key, "skipped"), "goal": f">= {GOAL_RATIO}", "met": None})
            continue
        v = variants[key]
        value = ratio(v.tool, v.bare)
        rows.append({"row": row, "value": f"{value:.3f} (tool {step_ms(v):.2f} ms/step, bare {step_ms(v, v.bare):.2f})",
                     "ratio": value, "goal": f">= {GOAL_RATIO}", "met": value >= GOAL_RATIO})
    value = ratio(tool_eval, bare_eval_rates)
    rows.append({"row": "tool/bare eval (defaults)", "value": f"{value:.3f} (tool {statistics.median(tool_eval):.0f} "
                 f"img/s, bare {statistics.median(bare_eval_rates):.0f} img/s)", "ratio": value, "goal": "", "met": None})
    for row, key, against in GAINS:
        note = ""
        if key == "fast_compile" and "fast" not in variants:  # the CPU with --compile: no fast set to build on
            against, note = "base", " vs the float32 defaults"
        if key not in variants or against not in variants:
            rows.append({"row": row, "value": skipped.get(key) or skipped.get(against), "goal": "", "met": None})
            continue
        a, b = variants[key], variants[against]
        gain = ratio(a.tool, b.tool)
        value = f"x{gain:.2f} ({step_ms(b):.2f} -> {step_ms(a):.2f} ms/step{note})"
        if a.cfg.train.compile:
            value += f"; first round incl. compilation {a.warmup_s:.0f} s, {dynamo_graphs()} graph(s) compiled"
        rows.append({"row": row, "value": value, "gain": gain, "goal": "", "met": None})

    # Projection: the 200-epoch ce.yaml recipe at the measured step times, for the defaults, the fast set
    # and the fast set compiled (rows kept when skipped, so every run prints the same table).
    epochs, steps = base.cfg.train.epochs, base.run.info.steps_per_epoch
    parts: dict[str, dict] = {}
    for key in ("base", "fast", "fast_compile"):
        label = {"base": "defaults", "fast": "fast set", "fast_compile": "fast set + compile"}[key]
        rows_of = (f"projected {epochs} epochs, {label}: train + final evaluation",
                   f"projected {epochs} epochs, {label}: as configured")
        if key not in variants:
            rows.extend({"row": row, "value": skipped.get(key), "goal": f"<= {GOAL_SECONDS:.0f} s", "met": None}
                        for row in rows_of)
            continue
        v = variants[key]
        eval_s = statistics.median(timed(device, lambda: engine.collect_logits(
            v.loop.model, v.run.data.test, device, v.cfg.eval.batch_size)) for _ in range(2))
        ckpt_s = statistics.median(timed(device, lambda: engine.save_checkpoint(v.loop, 1)) for _ in range(2))
        train_s = epochs * steps * step_ms(v) / 1000
        evals = epochs // v.cfg.eval.every + 1  # every eval.every epochs (the last always), then finish's
        final_only = train_s + eval_s
        as_configured = (setup_s or 0) + train_s + evals * eval_s + epochs * ckpt_s
        rows.append({"row": rows_of[0], "value": f"{final_only:.0f} s = {epochs} x {steps} steps x "
                     f"{step_ms(v):.2f} ms + eval {eval_s:.2f} s", "seconds": final_only,
                     "goal": f"<= {GOAL_SECONDS:.0f} s", "met": final_only <= GOAL_SECONDS})
        rows.append({"row": rows_of[1], "value": f"{as_configured:.0f} s (setup {setup_s or 0:.2f} s, test evaluated "
                     f"{evals}x at {eval_s:.2f} s, checkpoint {ckpt_s * 1000:.0f} ms/epoch)", "seconds": as_configured,
                     "goal": f"<= {GOAL_SECONDS:.0f} s", "met": as_configured <= GOAL_SECONDS})
        parts[key] = {"train_s": train_s, "eval_total_s": evals * eval_s, "ckpt_total_s": epochs * ckpt_s,
                      "tool_ms": step_ms(v)}

    # Where a step's time goes (fast set, else defaults): the engine's step, the bare step on pre-staged
    # data, and the GPU's own kernel time in the bare step (what a launch-free step would approach).
    key = "fast" if "fast" in variants else "base"
    v = variants[key]
    k = max(1, min(10, v.train.n))
    tool_p = bare_p = None
    try:
        with quiet_fds(ctx.work / "logs" / "profiler.log"):  # kineto prints to the C file descriptors
            tool_p = profile_steps(ctx, lambda: tool_round(ctx, v, k), k)
            with _amp(v.cfg, device):
                bare_p = profile_steps(ctx, lambda: bare_train(v.loop.model, v.loop.method, v.loop.optimizer,
                                                               v.xs[:k], v.ys[:k]), k)
    except Exception as exc:
        ctx.notes.append(f"profiler: {failure(exc)}")
    tool_ms, bare_ms = step_ms(v), step_ms(v, v.bare)
    row, which = "step breakdown", "fast set" if key == "fast" else "defaults"
    if tool_p is not None and bare_p is not None:
        gpu = f"GPU kernels {bare_p['gpu_ms']:.2f} ms" if bare_p["gpu_ms"] is not None else "GPU time n/a (CPU)"
        value = (f"{which}: tool {tool_ms:.2f} ms, bare {bare_ms:.2f} ms, {gpu}; per step tool / bare: kernel launches "
                 f"{tool_p['launches']:.0f} / {bare_p['launches']:.0f}, syncs {tool_p['syncs']:.2f} / "
                 f"{bare_p['syncs']:.2f}, memcpy calls {tool_p['copies']:.1f} / {bare_p['copies']:.1f}")
        rows.append({"row": row, "value": value, "goal": "", "met": None, "tool_profile": tool_p, "bare_profile": bare_p})
    else:
        rows.append({"row": row, "value": f"{which}: tool {tool_ms:.2f} ms, bare {bare_ms:.2f} ms; profiler failed", "goal": "",
                     "met": None})
    rows.append({"row": f"dominant cost of the {epochs}-epoch run",
                 "value": f"{which}: " + dominant(parts[key], tool_ms, bare_ms, bare_p, tool_p), "goal": "", "met": None})
    if "fast_compile" in skipped and ctx.cuda:
        ctx.notes.append(f"train.compile: {skipped['fast_compile']}")


def dynamo_graphs() -> str:
    """How many graphs torch.compile built: one or two per training step is normal, more is recompilation."""
    try:
        from torch._dynamo.utils import counters

        return str(counters["stats"]["unique_graphs"])
    except Exception:
        return "?"


@contextlib.contextmanager
def quiet_fds(log: Path):
    """stdout and stderr redirected at the file-descriptor level (C++ libraries print there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def dominant(parts: dict, tool_ms: float, bare_ms: float, bare_p: Optional[dict], tool_p: Optional[dict]) -> str:
    """Name the cost that dominates the projected run: evaluation, engine/data overhead, launches, GPU compute."""
    steps_total = parts["train_s"] / (parts["tool_ms"] / 1000)
    costs = {"test evaluation every epoch": parts["eval_total_s"], "checkpoints": parts["ckpt_total_s"]}
    if bare_p is not None:
        costs["engine/data overhead (tool - bare step)"] = steps_total * max(0.0, tool_ms - bare_ms) / 1000
        if bare_p["gpu_ms"] is not None:
            gpu = min(bare_p["gpu_ms"], bare_ms)
            costs["kernel launches / host work (bare step - GPU kernel time)"] = steps_total * (bare_ms - gpu) / 1000
            costs["GPU compute (kernel time)"] = steps_total * gpu / 1000
        else:
            costs["compute (bare step)"] = steps_total * bare_ms / 1000
    else:
        costs["training steps"] = parts["train_s"]
    name, seconds = max(costs.items(), key=lambda kv: kv[1])
    total = sum(costs.values())
    text = f"{name}: {seconds:.0f} of {total:.0f} s (" + ", ".join(f"{k} {s:.0f} s" for k, s in costs.items()
                                                                 if k != name) + ")"
    if tool_p is not None and tool_p["syncs"] >= 0.5:
        text += f"; the tool waits for the device {tool_p['syncs']:.1f}x per step (syncs)"
    return text


# ----------------------------------------------------------------------------- report


def print_report(ctx: Ctx) -> None:
    say("\n| check | result | seconds | detail |")
    say("|---|---|---|---|")
    for c in ctx.checks:
        say(f"| {c.name} | {c.status} | {c.seconds:.1f} | {c.detail} |")
    what = "ResNet-32, batch 128, CIFAR-10-LT" if not ctx.args.tiny else "--tiny: BN-MLP, batch 16, fake data"
    say(f"\n| speed ({what}) | value | goal (not a pass condition) |")
    say("|---|---|---|")
    for row in ctx.perf:
        mark = "" if row.get("met") is None else (" met" if row["met"] else " MISSED")
        say(f"| {row['row']} | {row['value']} | {row.get('goal', '')}{mark} |")
    for note in ctx.notes:
        say(f"note: {note}")
    failed = [c.name for c in ctx.checks if not c.passed]
    say(f"\n{len(ctx.checks) - len(failed)} of {len(ctx.checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "") + f"; total {ctx.elapsed():.0f} s")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="directory holding cifar-10-batches-py/ (default: $LONGTAIL_DATA)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny fake data and a BN-MLP: the same path in seconds")
    parser.add_argument("--rounds", type=int, default=6, help="alternating speed rounds")
    parser.add_argument("--batches", type=int, default=25, help="batches per speed round and variant")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds; train.compile is skipped when short")
    parser.add_argument("--compile", action="store_true", help="also measure train.compile on the CPU")
    parser.add_argument("--no-compile", action="store_true", help="do not measure train.compile")
    parser.add_argument("--workdir", help="keep the runs and logs here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        say("gpu_check: skipped (no CUDA); --device cpu runs the checks on the CPU, --device cpu --tiny in seconds")
        return 0
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", 0)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="longtail-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    data_root, data_kind = choose_data(args, work)
    ctx = Ctx(args, device, data_root, data_kind, work)
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if ctx.cuda
             else f"CPU, {torch.get_num_threads()} threads")
    say(f"longtail GPU check: torch {torch.__version__} on {where}\ndata: {data_kind}\nwork dir: {work}")
    for section in (check_families, check_more_merge, check_resume, check_collectives, measure_speed):
        try:
            section(ctx)
        except Exception as exc:  # a section's own bug must not hide the others' results
            with open(work / "logs" / "sections.log", "a") as f:
                traceback.print_exc(file=f)
            ctx.add(Check(section.__name__, "failed", 0.0, failure(exc, work / "logs" / "sections.log")))
            reset_backends()
    print_report(ctx)
    passed = all(c.passed for c in ctx.checks)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": where, "data": data_kind, "passed": passed, "seconds": ctx.elapsed(),
            "checks": [asdict(c) | {"passed": c.passed} for c in ctx.checks], "speed": ctx.perf, "notes": ctx.notes,
        }, indent=1, default=str))
    if passed and not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not passed:
        say(f"runs and logs kept in {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
