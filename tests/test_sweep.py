"""`longtail sweep`: grid x seeds as run directories, skipped when finished, resumed when interrupted,
refused when a directory holds another config, run N at a time with the cores split, failures reported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import longtail
from fake_data import write_fashion_mnist
from longtail.errors import ConfigError
from longtail.sweep import (Outcome, Point, check_points, parse_grid, parse_seeds, plan, progress_line, slot_environments,
                            thread_cap)

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

CE = str(Path(longtail.__file__).parents[1] / "configs" / "cifar10_lt" / "ce.yaml")
TINY = {"data": {"name": "fashion_mnist_lt", "imbalance": 5, "batch_size": 16, "augment": "none"},
        "model": {"name": "mlp", "width": 16}, "train": {"epochs": 1}, "eval": {"batch_size": 256}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_fashion_mnist(root / "data", train_per_class=20, test_per_class=4)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return root, config


def _sweep(config, root, *args):
    cmd = [sys.executable, "-m", "longtail", "sweep", str(config), *args, "--data-root", str(root / "data")]
    # Run in the sweep's directory (relative --out), importing this checkout of longtail.
    env = {**os.environ, "PYTHONPATH": str(Path(longtail.__file__).parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)


def test_grid_values_are_yaml_lists_and_list_valued_keys_work():
    grid = parse_grid(["loss.name=[ce,la]", "schedule.milestones=[[0.5,0.75],[0.8,0.9]]"])
    assert grid == [("loss.name", ["ce", "la"]), ("schedule.milestones", [[0.5, 0.75], [0.8, 0.9]])]
    points = plan(CE, ["train.epochs=2"], grid, [0, 1], "out")
    assert [p.name for p in points][:3] == ["loss.name=ce,schedule.milestones=[0.5,0.75],seed=0",
                                            "loss.name=ce,schedule.milestones=[0.5,0.75],seed=1",
                                            "loss.name=ce,schedule.milestones=[0.8,0.9],seed=0"]
    assert len(points) == 8
    assert points[-1].overrides == ["train.epochs=2", 'loss.name="la"', "schedule.milestones=[0.8, 0.9]",
                                    "train.seed=1"]
    with pytest.raises(ConfigError, match="YAML list"):
        parse_grid(["loss.name=ce"])
    with pytest.raises(ConfigError, match="--seeds"):
        parse_grid(["train.seed=[0,1]"])
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_seeds("0,a")


def test_a_bad_grid_value_stops_the_sweep_before_any_run():
    with pytest.raises(ConfigError, match="loss.name: 'foo' is not allowed"):
        plan(CE, [], parse_grid(["loss.name=[ce,foo]"]), [0], "out")



def test_a_list_valued_key_given_one_list_gets_the_nested_form(tmp_path, capsys):
    from longtail.cli import main

    out = tmp_path / "sw"
    assert main(["sweep", CE, "--grid", "schedule.milestones=[0.5,0.9]", "--out", str(out)]) == 2
    assert ("longtail sweep: error: --grid 'schedule.milestones=[0.5,0.9]': schedule.milestones takes a list and 0.5 "
            "is not one; the grid needs one list per point, e.g. --grid 'schedule.milestones=[[0.5,0.9]]'"
            in capsys.readouterr().err)
    assert not out.exists()
    assert parse_grid(["eval.thresholds=[null,[100,20]]"]) == [("eval.thresholds", [None, [100, 20]])]  # null: a value


def test_a_grid_value_given_twice_is_refused_as_a_seed_given_twice_is(tmp_path, capsys):
    from longtail.cli import main

    out = tmp_path / "sw"
    # No data there: points that got past the check would stop at once instead of training.
    assert main(["sweep", CE, f"data.root={tmp_path / 'none'}", "--grid", "loss.name=[ce,ce]", "--out", str(out)]) == 2
    assert ("longtail sweep: error: --grid 'loss.name=[ce,ce]': loss.name=ce is given twice; give each value once"
            in capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"schedule.milestones=\[0.5\] is given twice"):
        parse_grid(["schedule.milestones=[[0.5],[0.8],[0.5]]"])


@pytest.mark.parametrize("command", ["sweep", "reproduce"])
def test_an_empty_seeds_value_is_refused_not_read_as_the_default(tmp_path, capsys, command):
    from longtail.cli import main

    out = tmp_path / "out"
    # No data there: a command that got past --seeds would stop at once instead of training.
    where = ["--out", str(out), "--data-root", str(tmp_path / "none")]
    args = [CE, "--grid", "loss.name=[ce]"] if command == "sweep" else ["ldam_drw", "--budget", "smoke"]
    assert main([command, *args, "--seeds", "", *where]) == 2
    err = capsys.readouterr().err
    assert f"longtail {command}: error: --seeds '': expected comma-separated integers, e.g. 0,1,2" in err
    assert not out.exists()


def test_a_baseline_that_is_no_point_stops_the_sweep_before_any_run(tmp_path):
    from longtail.sweep import sweep

    with pytest.raises(ConfigError, match=r"--baseline loss.name=focal: not a point of this sweep \(points: "
                                          r"loss.name=ce, loss.name=la"):
        sweep(CE, [], parse_grid(["loss.name=[ce,la]"]), [0, 1], str(tmp_path), baseline="loss.name=focal")
    assert not any(tmp_path.iterdir())


def test_the_cores_are_split_between_jobs_and_each_job_gets_one_gpu():
    envs = slot_environments(jobs=3, cores=16, gpus=["4", "5"])
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["5", "5", "5"]  # 15 threads on 16 cores, not 48
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "5", "4"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in slot_environments(jobs=2, cores=2, gpus=[]))
    assert slot_environments(jobs=4, cores=2, gpus=[])[0]["OMP_NUM_THREADS"] == "1"


def test_the_sweeps_own_thread_count_caps_each_run(monkeypatch):
    assert [e["OMP_NUM_THREADS"] for e in slot_environments(jobs=1, cores=2, gpus=[], cap=1)] == ["1"]
    assert [e["OMP_NUM_THREADS"] for e in slot_environments(jobs=2, cores=16, gpus=[], cap=32)] == ["8", "8"]
    for value, cap in [("1", 1), (" 3 ", 3), ("0", None), ("two", None), ("", None)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert thread_cap() == cap
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_cap() is None


def test_sweep_runs_skips_finished_and_resumes_interrupted_points(setup):
    root, config = setup
    args = ["--grid", "loss.name=[ce,la]", "--seeds", "0,1", "--out", "sw", "--jobs", "2", "--baseline", "loss.name=ce"]
    first = _sweep(config, root, *args)
    assert first.returncode == 0, first.stderr
    names = ["loss.name=ce,seed=0", "loss.name=ce,seed=1", "loss.name=la,seed=0", "loss.name=la,seed=1"]
    for name in names:
        results = json.loads((root / "sw" / name / "results.json").read_text())
        assert results["seed"] == int(name[-1]) and results["loss"] == name.split(",")[0].split("=")[1]
    assert sorted(line.split("] ")[1].split(":")[0] for line in first.stdout.splitlines() if line.startswith("[")) \
        == names
    assert "sw: 4 ran, 0 already finished, 0 failed" in first.stdout
    assert "Paired differences against sw/loss.name=ce,seed=0" in first.stdout  # the report, with its baseline
    log = (root / "sw" / "logs" / "loss.name=la,seed=1.log").read_text()
    assert log.splitlines()[0].endswith("--out sw/loss.name=la,seed=1 --resume --data-root " + str(root / "data"))

    # An interrupted point: its checkpoint is there, its results are not.
    (root / "sw" / "loss.name=la,seed=1" / "results.json").unlink()
    stamp = (root / "sw" / "loss.name=ce,seed=0" / "results.json").stat().st_mtime_ns
    second = _sweep(config, root, *args)
    assert second.returncode == 0, second.stderr
    assert "1 ran, 3 already finished, 0 failed" in second.stdout
    assert (root / "sw" / "loss.name=la,seed=1" / "results.json").exists()
    assert (root / "sw" / "loss.name=ce,seed=0" / "results.json").stat().st_mtime_ns == stamp  # not rerun
    attempt = (root / "sw" / "logs" / "loss.name=la,seed=1.log").read_text().split("$ ")[-1]
    assert "holds no checkpoint yet" not in attempt and "run sw/loss.name=la,seed=1" in attempt  # continued
    epochs = [json.loads(line)["epoch"] for line in
              (root / "sw" / "loss.name=la,seed=1" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]  # the finished epoch was not trained again

    # Another recipe swept into the same directory is compared with the baseline an earlier sweep ran there.
    other = _sweep(config, root, "--grid", "loss.name=[bs]", "--seeds", "0", "--out", "sw", "--baseline",
                   "loss.name=ce")
    assert other.returncode == 0, other.stderr
    assert "Paired differences against sw/loss.name=ce,seed=0" in other.stdout
    assert "sw/loss.name=bs,seed=0" in other.stdout.split("Paired differences")[1]


def test_a_directory_with_another_config_stops_the_sweep_naming_the_keys(setup, tmp_path):
    root, config = setup
    points = plan(str(config), [], parse_grid(["loss.name=[ce]"]), [0], tmp_path)
    points[0].out.mkdir()
    saved = yaml.safe_load(config.read_text())
    saved.update(loss={"name": "ce"}, optim={"lr": 0.5})
    (points[0].out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"holds a run of another config \(differs in optim.lr\)"):
        check_points(points)
    saved["optim"]["lr"] = 0.1  # the default: the same config spelled out
    saved["train"]["device"] = "cpu"  # does not change what is computed
    (points[0].out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_points(points) == points


def test_a_failed_point_is_reported_and_does_not_stop_the_others(setup):
    root, config = setup
    # batch 1 passes validation but cannot train the BN-MLP: that run fails, the other finishes.
    result = _sweep(config, root, "--grid", "data.batch_size=[1,16]", "--out", "fail")
    assert result.returncode == 2
    assert "data.batch_size=1,seed=0: FAILED (exit 2)" in result.stdout and "data.batch_size: 1 cannot" in result.stdout
    assert (root / "fail" / "data.batch_size=16,seed=0" / "results.json").exists()
    assert "1 ran, 0 already finished, 1 failed" in result.stdout
    assert "1 of 2 runs failed (data.batch_size=1,seed=0)" in result.stderr
    assert "| fail/data.batch_size=16,seed=0 |" in result.stdout  # the report of what finished


def test_a_stop_signal_checkpoints_the_running_points_and_the_same_command_continues(setup):
    import signal
    import time

    root, config = setup
    args = [sys.executable, "-m", "longtail", "sweep", str(config), "train.epochs=12", "--grid", "loss.name=[ce,la]",
            "--out", "stop", "--data-root", str(root / "data")]
    env = {**os.environ, "PYTHONPATH": str(Path(longtail.__file__).parents[1])}
    sweep = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (root / "stop" / "loss.name=ce,seed=0" / "checkpoint.pt").exists():  # the first point trains
        assert time.monotonic() < deadline and sweep.poll() is None
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)  # what a scheduler sends the sweep's own job
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, err
    assert "loss.name=ce,seed=0: stopped by a signal" in out and "1 not started" in err
    assert not (root / "stop" / "loss.name=la,seed=0").exists()
    assert "longtail train: stopped: stopped by signal 15" in (root / "stop" / "logs" / "loss.name=ce,seed=0.log").read_text()
    again = _sweep(config, root, "train.epochs=12", "--grid", "loss.name=[ce,la]", "--out", "stop")
    assert again.returncode == 0 and "2 ran, 0 already finished, 0 failed" in again.stdout
    epochs = [json.loads(line)["epoch"] for line in
              (root / "stop" / "loss.name=ce,seed=0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # continued from the checkpoint, nothing trained twice


def test_progress_line_names_the_task_s_headline_metrics(tmp_path):
    point = Point("loss.name=bce,seed=0", "c.yaml", [], tmp_path)
    single = Outcome(point, "finished", 12.0, results={"top1": 80.0, "many": 90.0, "medium": 75.5, "few": 60.25})
    multi = Outcome(point, "finished", 5.0, results={"task": "multi_label", "map": 61.8, "map_head": 69.35,
                                                     "map_medium": 63.44, "map_tail": 54.94})
    assert progress_line(1, 2, single).endswith("12 s; All 80.00, Many 90.00, Medium 75.50, Few 60.25")
    assert progress_line(2, 2, multi).endswith("5 s; mAP 61.80, Head 69.35, Medium 63.44, Tail 54.94")
