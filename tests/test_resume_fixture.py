"""A checkpoint written by an earlier version of longtail resumes to the run it would have finished.

tests/fixtures/resume_v1 holds a tiny run killed in the middle of its second epoch (config.yaml, metrics.jsonl,
checkpoint.pt) and the same run's uninterrupted result (expected/), written by
tests/fixtures/make_resume_fixture.py; resume_more_lowrank_lr the same with MORE and the key `more.lowrank_lr`,
now the deprecated alias of `finetune.lr_lowrank`. Users' half-finished runs outlive refactors: whatever moves
inside the package, these checkpoints must keep loading and continue to the same weights and records.
"""
import pytest
import json
import shutil
from pathlib import Path

import torch

from longtail.config import load_config
from longtail.engine import fit

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

FIXTURES = Path(__file__).parent / "fixtures"
TIMINGS = ("images_per_sec", "epoch_seconds")


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in path.read_text().splitlines()]


def _close(a, b, where: str, rtol: float, atol: float) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}", rtol, atol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= atol + rtol * abs(b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", ["resume_v1", "resume_more_lowrank_lr"])
def test_a_saved_mid_epoch_checkpoint_resumes_to_the_uninterrupted_run(name, tmp_path, data_root):
    run, fixture = tmp_path / "run", FIXTURES / name
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("expected", "made_with.json"))
    assert "partial" in torch.load(run / "checkpoint.pt", weights_only=True)  # the fixture is mid-epoch
    fit(load_config(run / "config.yaml"), run, resume=True, data_root=data_root)

    # The fixture was written on one CPU and this suite runs on others (AMD EPYC, Intel): their float32
    # kernels may round differently (vector width, FMA), so the comparison is at float32 tolerance, not bit
    # for bit. On the machine that wrote it the resume is bit-identical (test_resume.py holds that contract).
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(fixture / "expected" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
        else:
            assert torch.equal(got[key], want[key]), key

    got_records, want_records = _records(run / "metrics.jsonl"), _records(fixture / "expected" / "metrics.jsonl")
    assert [r["epoch"] for r in got_records] == [1, 2, 3]
    for got_r, want_r in zip(got_records, want_records):
        # A logit a rounding apart may flip one test image (10 a class, 100 in all): accuracies, and the
        # bin accuracies ECE compares, may move by 1 point; everything else at float32 tolerance.
        for key in ("top1", "balanced", "many", "medium", "few", "ece"):
            a, b = got_r["test"].pop(key), want_r["test"].pop(key)
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1.0 + 1e-6), (key, a, b)
        _close(got_r, want_r, f"epoch {want_r['epoch']}", rtol=1e-5, atol=1e-5)


def test_a_checkpoint_whose_parameter_groups_differ_is_refused_in_one_line(tmp_path, data_root):
    """The groups an old run's optimiser saved, and the ones this version builds, must match one for one."""
    from longtail.errors import ConfigError

    run = tmp_path / "run"
    fixture = FIXTURES / "resume_more_lowrank_lr"
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("expected", "made_with.json"))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["optimizer"]["param_groups"].reverse()  # as an older version ordered them differently
    torch.save(state, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ConfigError, match=r"--resume: the optimiser in .*checkpoint.pt holds parameter groups of "
                                          r"\[8, 7, 4\] parameters, and this version of longtail builds \[4, 7, 8\]"):
        fit(load_config(run / "config.yaml"), run, resume=True, data_root=data_root)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}  # the run lock's file stays
    assert after == before  # nothing written
