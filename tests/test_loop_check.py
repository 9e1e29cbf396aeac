"""training.loop.check: what the step loop does at each check point (the one wait for the device)."""
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longtail.config import load_config
from longtail.errors import DivergedError
from longtail.progress import Progress
from longtail.training import loop as loop_module
from longtail.training.loop import Epoch, check
from longtail.training.stopping import Preempted, StopFlag


class Trackers:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.extend((tag, value, step) for tag, value in values.items())


def _loop(stop_signum=None):
    stop = StopFlag()
    stop.signum = stop_signum
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return SimpleNamespace(cfg=load_config(None, ["train.epochs=2"]), model=model, optimizer=optimizer,
                           scheduler=SimpleNamespace(last_epoch=7), steps_per_epoch=10, out=Path("/run"),
                           trackers=Trackers(), stop=stop, started=(time.perf_counter(), 0))


def _epoch(window, window_steps, sums=None, nonfinite=False):
    return Epoch(index=1, usable=10, num_batches=10, aug_gen=torch.Generator(), nonfinite=torch.tensor(nonfinite),
                 bar=Progress(10, "epoch", "step", lines=False), start=time.perf_counter(), seen=32,
                 sums=dict(sums or {}), window=dict(window), window_steps=window_steps)


def test_the_window_folds_into_the_sums_and_is_logged_as_means(monkeypatch):
    saved = []
    monkeypatch.setattr(loop_module, "save_checkpoint", lambda *a: saved.append(a))
    loop = _loop()
    ep = _epoch({"loss": torch.tensor(3.0, dtype=torch.float64), "ce": 1.0}, 2, sums={"loss": torch.tensor(1.0)})
    check(loop, ep, i=3)
    assert float(ep.sums["loss"]) == 4.0 and ep.sums["ce"] == 1.0
    assert ep.window == {} and ep.window_steps == 0
    step = 1 * 10 + 3  # epoch 1, batch 3 (one micro-batch a step)
    assert loop.trackers.logged == [("train/loss", 1.5, step), ("train/lr", 0.5, step), ("train/ce", 0.5, step)]
    assert saved == []  # not due, not stopping


def test_a_non_finite_loss_stops_before_anything_is_folded_or_saved(monkeypatch):
    monkeypatch.setattr(loop_module, "save_checkpoint", lambda *a: pytest.fail("saved a non-finite state"))
    ep = _epoch({"loss": torch.tensor(float("nan"))}, 1, nonfinite=True)
    with pytest.raises(DivergedError, match="epoch 2, at or before step 5"):
        check(_loop(), ep, i=4, due=True)
    assert ep.sums == {}


@pytest.mark.parametrize("overrides, advice", [
    ([], "Try a lower optim.lr."),
    (["more.enabled=true", "more.amplitude=0.5"], "Try a lower optim.lr or a lower more.amplitude (now 0.5)."),
    (["train.amp=true", "train.amp_dtype=bfloat16"], "Try a lower optim.lr or train.amp=false."),
])
def test_the_divergence_advice_names_only_the_keys_the_run_uses(overrides, advice):
    loop = _loop()
    loop.cfg = load_config(None, ["train.epochs=2", *overrides])
    with pytest.raises(DivergedError) as raised:
        check(loop, _epoch({"loss": torch.tensor(float("inf"))}, 1, nonfinite=True), i=0)
    assert str(raised.value).endswith(advice)


def test_a_due_checkpoint_records_the_position_and_a_stop_checkpoints_then_raises(monkeypatch):
    saved = []
    monkeypatch.setattr(loop_module, "save_checkpoint", lambda loop, epoch, partial: saved.append((epoch, partial)))
    check(_loop(), _epoch({"loss": 1.0}, 1), i=4, due=True)
    (epoch, partial), = saved
    assert epoch == 1 and partial["epoch"] == 1 and partial["batch"] == 5 and partial["steps_done"] == 7
    assert partial["rank"]["seen"] == 32 and partial["rank"]["sums"] == {"loss": 1.0}

    saved.clear()
    check(_loop(), _epoch({"loss": 1.0}, 1), i=9, due=True)  # the epoch's last batch: its own checkpoint follows
    assert saved == []

    with pytest.raises(Preempted, match="signal 15 after step 3 of epoch 2"):
        check(_loop(stop_signum=15), _epoch({"loss": 1.0}, 1), i=2)
    assert saved and saved[0][1]["batch"] == 3
