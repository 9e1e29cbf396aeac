"""One requeue command at any moment: --resume without a checkpoint, on a finished run, after a stop
signal, from a mid-epoch checkpoint (bit for bit), with best.pt and metrics.jsonl consistent after a kill."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from crash_method import CrashAt, killed_at
from longtail import engine
from longtail.checkpoint import atomic_torch_save, load_checkpoint
from longtail.config import load_config
from longtail.engine import Preempted, fit
from longtail.errors import ConfigError
from longtail.methods import register_method
from longtail.methods.base import Method
from longtail.runtime import restore_rng, rng_state
from longtail.training import checkpointing
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [*TINY_MLP, "data.augment=crop_flip", "train.epochs=3", "train.log_every=2", "schedule.name=cosine"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    fit(load_config(None, TINY), out, data_root=data_root)
    return out


def _assert_same_run(run, reference):
    a, b = torch.load(run / "model.pt", weights_only=True), torch.load(reference / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = ("images_per_sec", "epoch_seconds")
    records = [[{k: v for k, v in json.loads(line).items() if k not in strip}
                for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, reference)]
    assert records[0] == records[1]


class SignalAt(Method):
    """Sends this process a signal before its `STOP_AT`-th training forward (as a scheduler would)."""

    calls = 0
    stop_at = 0
    signum = signal.SIGTERM
    times = 1

    def loss(self, model, x, y, progress):
        SignalAt.calls += 1
        if SignalAt.calls == SignalAt.stop_at:
            for _ in range(SignalAt.times):
                os.kill(os.getpid(), SignalAt.signum)
        return super().loss(model, x, y, progress)


register_method("signal_test", f"{__name__}:SignalAt")


def _signal_cfg(extra=()):
    cfg = load_config(None, [*TINY, *extra])
    cfg.method.name = "signal_test"
    return cfg


def test_resume_without_a_checkpoint_starts_the_run_and_says_so(tmp_path, data_root, reference, capsys):
    out = tmp_path / "run"
    fit(load_config(None, TINY), out, resume=True, data_root=data_root)
    assert "holds no checkpoint yet; starting the run" in capsys.readouterr().out
    _assert_same_run(out, reference)


def test_resume_of_a_finished_run_reports_it_and_rewrites_nothing(tmp_path, data_root, reference, capsys):
    out = tmp_path / "run"
    fit(load_config(None, TINY), out, data_root=data_root)
    # .lock is not a file of the run: each command that takes the lock writes its pid there.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    results = fit(load_config(None, TINY), out, resume=True, data_root=data_root)
    shown = capsys.readouterr().out
    assert "already finished" in shown and "| All |" in shown
    assert results == json.loads((out / "results.json").read_text())
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    with pytest.raises(ConfigError, match="optim.lr"):  # a different config is still refused
        fit(load_config(None, [*TINY, "optim.lr=0.5"]), out, resume=True, data_root=data_root)


def test_a_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, data_root, reference):
    out = tmp_path / "run"
    fit(load_config(None, TINY), out, data_root=data_root)
    for name in ("checkpoint.pt", "results.json", "model.pt", "model.yaml"):
        (out / name).unlink()  # what a kill in epoch 1 leaves, plus a stale record of that epoch
    (out / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 9.0}\n{"epoch": 2, "tra')
    (out / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    fit(load_config(None, TINY), out, resume=True, data_root=data_root)
    _assert_same_run(out, reference)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_stop_signal_checkpoints_mid_epoch_and_the_resumed_run_is_identical(tmp_path, data_root, reference, signum):
    out = tmp_path / "run"
    SignalAt.calls, SignalAt.stop_at, SignalAt.signum = 0, 17, signum  # epoch 2 (13 steps per epoch), step 4
    with pytest.raises(Preempted, match="--resume"):
        fit(_signal_cfg(), out, data_root=data_root)
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handlers are removed again
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 0 and state["partial"]["epoch"] == 1 and state["partial"]["batch"] == 4
    assert not (out / "results.json").exists()
    SignalAt.stop_at = 0
    cfg = _signal_cfg()
    fit(cfg, out, resume=True, data_root=data_root)
    _assert_same_run(out, reference)


@pytest.fixture
def foreground_ctrl_c():
    """Python's own Ctrl-C handler, as in a foreground start: a suite started in the background (`pytest &`) has
    SIGINT ignored, and a run started so rightly leaves Ctrl-C ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_like_a_stop_signal_and_a_second_stops_at_once(tmp_path, data_root, reference, capsys,
                                                                         foreground_ctrl_c):
    out = tmp_path / "run"
    SignalAt.calls, SignalAt.stop_at, SignalAt.signum, SignalAt.times = 0, 17, signal.SIGINT, 1
    with pytest.raises(Preempted, match="stopped by Ctrl-C after step 4 of epoch 2; .*--resume") as stopped:
        fit(_signal_cfg(), out, data_root=data_root)
    assert stopped.value.exit_code == 130
    assert "press Ctrl-C again to stop at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    assert load_checkpoint(out / "checkpoint.pt")["partial"]["batch"] == 4
    SignalAt.stop_at = 0
    fit(_signal_cfg(), out, resume=True, data_root=data_root)
    _assert_same_run(out, reference)

    twice = tmp_path / "twice"
    SignalAt.calls, SignalAt.stop_at, SignalAt.times = 0, 17, 2
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(_signal_cfg(), twice, data_root=data_root)
    finally:
        SignalAt.times = 1
    assert "partial" not in load_checkpoint(twice / "checkpoint.pt")  # stopped at once: epoch 1's checkpoint only


def test_stop_signals_are_configurable(monkeypatch):
    monkeypatch.setenv("LONGTAIL_STOP_SIGNALS", "usr1, SIGHUP")
    assert engine.stop_signals() == [signal.SIGUSR1, signal.SIGHUP]
    monkeypatch.setenv("LONGTAIL_STOP_SIGNALS", "TERM,NOPE")
    with pytest.raises(ConfigError, match="NOPE"):
        engine.stop_signals()


def test_mid_epoch_checkpoints_resume_bit_for_bit(tmp_path, data_root, reference):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.checkpoint_every=5"])
    killed_at(fit, cfg, out, data_root, 13 + 9)  # epoch 2, after the checkpoint at global step 20 (epoch 2, step 7)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["partial"]["epoch"] == 1 and state["partial"]["batch"] == 7 and state["partial"]["steps_done"] == 20
    fit(cfg, out, resume=True, data_root=data_root)
    _assert_same_run(out, reference)


def test_a_mid_epoch_checkpoint_refuses_another_number_of_processes(tmp_path, data_root):
    out = tmp_path / "run"
    SignalAt.calls, SignalAt.stop_at, SignalAt.signum = 0, 5, signal.SIGTERM
    with pytest.raises(Preempted):
        fit(_signal_cfg(), out, data_root=data_root)
    state = load_checkpoint(out / "checkpoint.pt")
    state["partial"]["world"] = 2
    atomic_torch_save(state, out / "checkpoint.pt")
    SignalAt.stop_at = 0
    with pytest.raises(ConfigError, match="written in the middle of epoch 1 by 2 processes"):
        fit(_signal_cfg(), out, resume=True, data_root=data_root)


def test_best_pt_is_never_from_an_abandoned_branch(tmp_path, data_root, monkeypatch):
    select = [*TINY, "data.val_per_class=3", "eval.select=best_val"]
    reference = tmp_path / "reference"
    fit(load_config(None, select), reference, data_root=data_root)
    best_epoch = json.loads((reference / "results.json").read_text())["epoch"]

    # Killed right after the checkpoint that made epoch `best_epoch` the best, before best.pt was written.
    out = tmp_path / "run"
    save = checkpointing.atomic_torch_save

    def save_or_die(obj, path):
        if path.name == "best.pt" and obj["epoch"] == best_epoch:
            raise KeyboardInterrupt("killed before best.pt")
        save(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_torch_save", save_or_die)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(None, select), out, data_root=data_root)
    monkeypatch.setattr(checkpointing, "atomic_torch_save", save)
    assert load_checkpoint(out / "checkpoint.pt")["best"]["epoch"] == best_epoch
    fit(load_config(None, select), out, resume=True, data_root=data_root)
    assert load_checkpoint(out / "best.pt")["epoch"] == best_epoch
    assert json.loads((out / "results.json").read_text())["per_class"] == \
        json.loads((reference / "results.json").read_text())["per_class"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, data_root, reference):
    out = tmp_path / "run"
    cfg = load_config(None, TINY)
    cfg.method.name = "crash_test"
    CrashAt.calls, CrashAt.crash_at = 0, 13 + 13 + 2  # in epoch 3: epochs 1 and 2 are recorded
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, data_root=data_root)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # killed while writing epoch 3's record
    CrashAt.crash_at = 0
    fit(cfg, out, resume=True, data_root=data_root)
    _assert_same_run(out, reference)


DRIVER = """
import os, signal, sys
from longtail import distributed
from longtail.cli import main

stop_at, forward, calls = int(os.environ["LONGTAIL_TEST_STOP_AT"]), distributed.MethodStep.forward, [0]

def forward_then_signal(self, *args):
    calls[0] += 1
    if calls[0] == stop_at:
        os.kill(os.getpid(), signal.SIGUSR2)
    return forward(self, *args)

distributed.MethodStep.forward = forward_then_signal
sys.exit(main(sys.argv[1:]))
"""


def test_cli_exits_143_on_a_stop_signal_and_the_same_command_finishes_the_run(tmp_path, data_root, reference):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    config = tmp_path / "tiny.yaml"
    config.write_text("")
    out = tmp_path / "run"
    command = [sys.executable, str(driver), "train", str(config), *TINY, "--out", str(out), "--resume"]
    env = {**os.environ, "LONGTAIL_DATA": data_root, "LONGTAIL_TEST_STOP_AT": "20", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(command, capture_output=True, text=True, env=env)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "stopped by signal" in stopped.stderr and "--resume" in stopped.stderr
    env["LONGTAIL_TEST_STOP_AT"] = "0"
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "already finished" in again.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["per_class"] == json.loads((reference / "results.json").read_text())["per_class"]


def test_the_saved_rng_state_continues_every_generator_where_it_stopped():
    import random

    import numpy as np

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    np.random.rand(5), np.random.randn(1), random.gauss(0, 1)  # mid-stream, a cached Gaussian in both
    state = rng_state()
    expected = (np.random.rand(3).tolist(), np.random.randn(2).tolist(), random.gauss(0, 1), torch.rand(2))
    np.random.seed(99), random.seed(99), torch.manual_seed(99)
    restore_rng(state)
    assert (np.random.rand(3).tolist(), np.random.randn(2).tolist(), random.gauss(0, 1)) == expected[:3]
    assert torch.equal(torch.rand(2), expected[3])


def test_seeds_outside_numpys_range_are_refused_in_the_config():
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=r"train.seed: must be in \[0, 2\*\*32\)"):
            load_config(None, [f"train.seed={seed}"])
    load_config(None, [f"train.seed={2**32 - 1}"])


def test_the_resolved_schedule_lists_milestones_only_for_multistep():
    assert "milestones" in engine.resolved_schedule(load_config(None, ["schedule.name=multistep"]))
    for name in ("cosine", "constant"):
        assert "milestones" not in engine.resolved_schedule(load_config(None, [f"schedule.name={name}"]))
