"""Collectives on the device the process group serves.

NCCL serves CUDA tensors only, and the CPU tests run gloo, which serves both: a CPU tensor handed to an
NCCL group passes every gloo test and crashes the first multi-GPU evaluation. A gloo group created as
"cuda:gloo" maps no CPU backend, as NCCL does, and so shows that failure on a CPU-only machine.
"""
import ast
import inspect
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import longtail
from fake_data import write_fashion_mnist
from launch import run_forked
from longtail import distributed
from longtail.config import load_config
from tiny import TINY_MLP

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="this torch build has no gloo backend for CPU processes")]

PACKAGE = Path(longtail.__file__).parent


@pytest.mark.parametrize("config,device", [
    ("cuda:nccl", "cuda"),  # NCCL: CUDA only
    ("cpu:gloo,cuda:nccl", "cuda"),  # the default map of a device-less init on a GPU machine
    ("cpu:gloo,cuda:gloo", "cpu"),  # gloo
    ("cuda:gloo", "cuda"),  # a CUDA-only map, as NCCL's
    ("cpu:gloo", "cpu"),
])
def test_the_communication_device_follows_the_backend_map(config, device):
    assert distributed.device_for_backend_config(config) == device


def _cuda_only_worker(rank: int, store: str) -> None:
    # The group has no CPU barrier (that is the point), so the ranks meet through a store of their own: a
    # rank that raced ahead and left would break its peer's connection set-up.
    meet = tdist.FileStore(store + ".meet", 2)

    def meet_at(name: str) -> None:
        meet.set(f"{name}{rank}", "1")
        meet.wait([f"{name}0", f"{name}1"], timedelta(seconds=60))

    tdist.init_process_group("cuda:gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=30))
    meet_at("up")
    try:
        assert tdist.get_backend_config() == "cuda:gloo"
        # The diagnosis: the old gather path handed CPU tensors to the group, which serves none.
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            tdist.all_gather(lengths, torch.tensor([3]))
        # The helper reads the map and asks for CUDA tensors instead.
        assert distributed.device_for_backend_config(tdist.get_backend_config()) == "cuda"
        meet_at("done")
    finally:
        tdist.destroy_process_group()


def test_a_cuda_only_group_refuses_cpu_tensors_which_the_old_gather_path_sent(tmp_path):
    run_forked(_cuda_only_worker, (str(tmp_path / "store"),))


def test_no_module_but_distributed_calls_torch_distributed():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.startswith("torch.distributed")]
    assert offenders == []


COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "barrier", "all_gather_object", "broadcast_object_list",
               "gather", "scatter", "reduce", "all_to_all", "reduce_scatter")


def _spy_worker(rank: int, port: int, root: str, out: str, queue) -> None:
    """Every training path that communicates, on 2 ranks, with torch.distributed's collectives spied on."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      LONGTAIL_DIST_TIMEOUT="60")
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            frames = [f.filename for f in inspect.stack()[1:] if Path(f.filename).is_relative_to(PACKAGE)]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors}
            calls.append((name, Path(frames[0]).name if frames else None, devices))
            return fn(*args, **kwargs)
        return wrapped

    for name in COLLECTIVES:
        setattr(tdist, name, spy(name, getattr(tdist, name)))
    from longtail.engine import fit

    common = [*TINY_MLP, "model.width=16", "train.epochs=1", "eval.batch_size=32", "data.val_per_class=3"]
    # Evaluation, BN averaging, mean_over_ranks, barriers, tracking (features), accumulation under DDP,
    # mid-epoch checkpoints (object gather), the post-hoc tau search; then stage 2 on cached features and
    # the tau-norm search.
    # One process group per run, each on a port of its own (as one run per torchrun launch would have).
    os.environ["MASTER_PORT"] = str(port)
    fit(load_config(None, [*common, "train.track_every=1", "train.accum_steps=2", "train.checkpoint_every=2",
                           "posthoc.kind=additive", "eval.select=best_val"]), Path(out) / "stage1", data_root=root)
    stage1 = f"method.init_from={Path(out) / 'stage1'}"
    os.environ["MASTER_PORT"] = str(port + 1)
    fit(load_config(None, [*common, "method.name=wb_stage2", "method.cache_features=true", "loss.name=cb",
                           stage1]), Path(out) / "stage2", data_root=root)
    os.environ["MASTER_PORT"] = str(port + 2)
    fit(load_config(None, [*common, "method.name=tau_norm", "method.tau_norm_tau=null", stage1]), Path(out) / "tau",
        data_root=root)
    queue.put((rank, calls))


def test_every_collective_goes_through_the_helper_on_its_device(tmp_path):
    root = tmp_path / "data"
    write_fashion_mnist(root, train_per_class=30, test_per_class=6)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = 29500 + 3 * (os.getpid() % 300)
    procs = [ctx.Process(target=_spy_worker, args=(r, port, str(root), str(tmp_path / "runs"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, calls in results.items():
        names = {name for name, _, _ in calls}
        assert {"all_gather", "all_reduce", "barrier", "all_gather_object"} <= names, names
        assert [c for c in calls if c[1] != "distributed.py"] == [], "collectives called outside distributed.py"
        assert [c for c in calls if c[2] - {"cpu"}] == [], "tensors off the group's device (gloo: cpu)"
