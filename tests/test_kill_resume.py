"""scripts/kill_resume.sh on tiny fake data: a run SIGKILLed at random moments and resumed with the same
command each time ends identical to an uninterrupted one; the comparison says "no", and what, when not."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_data import write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kill_resume.sh"
TINY = ("data.name=fashion_mnist_lt data.imbalance=5 data.batch_size=16 data.augment=crop_flip model.name=mlp "
        "model.width=32 train.epochs=3 optim.lr=0.05 eval.batch_size=64 train.checkpoint_every=3")


# One early kill, then each of the six aimed moments once: uniform, eval, uniform, record, uniform, write.
KINDS = ["early", "uniform", "eval", "uniform", "record", "uniform", "write"]


def _script(*args, env, timeout=170):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill_resume")
    write_fashion_mnist(tmp / "data", train_per_class=40, test_per_class=10)
    (tmp / "tiny.yaml").write_text("")
    env = {**os.environ, "LONGTAIL_DATA": str(tmp / "data"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "OVERRIDES": TINY}
    proc = _script("--kills", str(len(KINDS)), "--early", "1", "--seed", "1", "--config", str(tmp / "tiny.yaml"),
                   "--out", str(tmp / "out"), env=env, timeout=480)
    return tmp / "out", env, proc


@pytest.mark.e2e
def test_killed_and_resumed_runs_are_identical_to_the_reference(killed):
    out, _, proc = killed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"{len(KINDS)} kills survived, identical: yes"
    assert "rerun of the finished run: 'already finished', exit 0, nothing rewritten" in lines
    kills = [row.split("\t") for row in (out / "kills.tsv").read_text().splitlines()]
    # Each aimed moment hit a running process: the eval kill waited for a phase the run announces in its log.
    assert [(row[0], row[3]) for row in kills] == [(str(n), kind) for n, kind in enumerate(KINDS, 1)]
    assert sum(line.startswith("kill ") for line in lines) == len(KINDS)  # each kill says what it interrupted
    assert not any("could not classify" in line for line in lines)
    for run in [out / "reference", *sorted(out.glob("killed-*"))]:
        assert (run / "results.json").exists() and (run / "model.pt").exists()


@pytest.mark.e2e
def test_compare_names_what_differs_and_ignores_timing(killed, tmp_path):
    out, env, _ = killed
    reference = out / "reference"
    timing_only, tampered = tmp_path / "timing_only", tmp_path / "tampered"
    for run in (timing_only, tampered):
        shutil.copytree(reference, run)
    # Timing fields differ in every real rerun: they are not compared.
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record["images_per_sec"] += 1.0
        record["epoch_seconds"] += 1.0
    for run in (timing_only, tampered):
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # One bit of one weight, and one metric.
    state = torch.load(reference / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.dtype == torch.float32 and v.numel() > 1)
    state[name].view(torch.int32).reshape(-1)[0] ^= 1
    torch.save(state, tampered / "model.pt")
    records[-1]["train_loss"] += 1e-12
    (tampered / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    same = _script("--compare", str(reference), str(timing_only), env=env)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines()[-1] == "identical: yes"

    differ = _script("--compare", str(reference), str(tampered), env=env)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert differ.stdout.splitlines()[-1] == "identical: no"
    assert f"model.pt: {name}: 1 of {state[name].numel()} values differ" in differ.stdout
    assert f"metrics.jsonl epoch {records[-1]['epoch']}.train_loss" in differ.stdout
    assert "images_per_sec" not in differ.stdout and "epoch_seconds" not in differ.stdout
