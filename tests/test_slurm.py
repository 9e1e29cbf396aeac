"""`longtail sweep --slurm`: the batch script submitit generates, and jobs run by submitit's local
executor: a job array, a preempted job requeued and resumed from its checkpoint, a two-process job
given RANK / WORLD_SIZE / MASTER_* from submitit's job environment."""
import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

import longtail
from fake_data import write_fashion_mnist
from longtail.slurm import TrainPoint, submit
from longtail.sweep import Outcome, parse_grid, plan

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

submitit = pytest.importorskip("submitit", reason="submitit is the optional extra `slurm` (in the test extra)")

TINY = {"data": {"name": "fashion_mnist_lt", "imbalance": 5, "batch_size": 16, "augment": "none"},
        "model": {"name": "mlp", "width": 16}, "train": {"epochs": 1}, "eval": {"batch_size": 256}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    write_fashion_mnist(root / "data", train_per_class=20, test_per_class=4)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return root, config


@pytest.fixture
def this_checkout(monkeypatch):
    """Jobs' `longtail train` processes import this checkout, wherever they start."""
    monkeypatch.setenv("PYTHONPATH", str(Path(longtail.__file__).parents[1]))


def test_the_batch_script_asks_for_the_partition_time_gpus_and_the_array(setup, tmp_path, monkeypatch):
    root, config = setup
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A fake sbatch keeps the script it is given and answers as SLURM does; srun only has to exist.
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    points = plan(str(config), [], parse_grid(["loss.name=[ce,la]"]), [0], tmp_path / "sw")
    options = {"partition": "gpu", "time": 30, "gpus": 2, "cpus": 8}
    jobs = submit(points, options, str(root / "data"), False, tmp_path / "sw" / "slurm")
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1"]
    script = (tmp_path / "submitted.sh").read_text()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --array=0-1%2",
                 "#SBATCH --signal=USR2@90", "#SBATCH --nodes=1"]:
        assert line in script.splitlines(), line
    assert "srun" in script and "submitit.core._submit" in script
    # Each array task runs its point's requeue-safe train command.
    with open(jobs[1].paths.submitted_pickle, "rb") as f:
        call = pickle.load(f).function
    assert isinstance(call, TrainPoint)
    assert call.command[-5:] == ["--out", str(points[1].out), "--resume", "--data-root", str(root / "data")]
    assert 'loss.name="la"' in call.command


def _fake_slurm(bin_dir: Path, runs_script_in: Path) -> None:
    """sbatch that keeps the script and runs it with sh (as SLURM's job would), srun that does nothing."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {runs_script_in}/submitted.sh\n'
                                    f'(cd {runs_script_in} && sh "$1")\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def test_shell_metacharacters_in_out_reach_the_batch_script_quoted_and_do_not_run(setup, tmp_path, monkeypatch):
    root, config = setup
    _fake_slurm(tmp_path / "bin", tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    out = tmp_path / "sw;touch pwned1;$(touch pwned2)`touch pwned3`"
    points = plan(str(config), [], parse_grid(["loss.name=[ce]"]), [0], out)
    submit(points, {"partition": "gpu;touch pwned4", "time": 5}, str(root / "data"), False, out / "slurm")
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --partition='gpu;touch pwned4'" in script.splitlines()
    assert not list(tmp_path.glob("pwned*"))  # the script ran, and none of the commands did


@pytest.mark.parametrize("option,value", [("partition", "gpu\ntouch pwned"), ("out", "sw\rx")])
def test_control_characters_in_partition_or_out_are_refused_before_anything_is_written(setup, tmp_path, monkeypatch,
                                                                                     capsys, option, value):
    from longtail.cli import main

    import longtail.slurm

    def no_submission(*args, **kwargs):
        raise AssertionError("submitted")

    _, config = setup
    _fake_slurm(tmp_path / "bin", tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(longtail.slurm, "run_slurm", no_submission)
    out = tmp_path / (value if option == "out" else "sw")
    extra = ["--partition", value] if option == "partition" else []
    assert main(["sweep", str(config), "--grid", "loss.name=[ce]", "--out", str(out), "--slurm", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--{option} " in err and "control character" in err
    assert not out.exists() and not (tmp_path / "submitted.sh").exists()


def test_slurm_where_there_is_none_is_one_line(setup, tmp_path, monkeypatch, capsys):
    from longtail.cli import main

    _, config = setup
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch, no srun
    out = tmp_path / "sw"
    assert main(["sweep", str(config), "--grid", "loss.name=[ce]", "--out", str(out), "--slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("longtail sweep: error: --slurm: SLURM is not available here (sbatch and srun not on PATH); run on "
                   "a SLURM login node, or leave out --slurm (--jobs N runs the points on this machine)")
    assert not out.exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_local_jobs_run_and_a_preempted_job_is_requeued_and_resumed(setup, tmp_path, this_checkout):
    root, config = setup
    points = plan(str(config), ["train.epochs=10", "eval.every=10"], parse_grid(["loss.name=[ce]"]), [0], tmp_path / "sw")
    (job,) = submit(points, {"cluster": "local", "time": 5}, str(root / "data"), False,
                    tmp_path / "sw" / "slurm")
    run = points[0].out
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():  # training has started: preempt it now
        assert time.monotonic() < deadline and not job.done(), job.stderr()
        time.sleep(0.05)
    (task,) = _children(job._process.pid)  # the controller's one task: submitit's handler lives there
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before a preemption
    assert job.result() == 0
    log = (tmp_path / "sw" / "slurm" / "loss.name=ce,seed=0.log").read_text()
    # train stopped at a checkpoint, then the requeued job continued it (no second "starting the run").
    assert "longtail train: stopped: stopped by signal" in log and log.count(f"run {run}:") == 2
    assert log.count("holds no checkpoint yet") == 1 and "Caught signal SIGUSR2" in job.stderr()
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 11))
    assert json.loads((run / "results.json").read_text())["epochs"] == 10


def test_a_two_process_job_gets_rank_and_world_size_from_submitit(setup, tmp_path, this_checkout):
    from longtail.slurm import run_slurm

    root, config = setup
    points = plan(str(config), [], parse_grid(["loss.name=[ce,la]"]), [0], tmp_path / "sw")
    done = []
    run_slurm(points, {"cluster": "local", "time": 5, "tasks": 2, "poll_s": 0.5}, str(root / "data"),
              False, tmp_path / "sw" / "slurm", done.append)
    assert sorted(o.point.name for o in done) == ["loss.name=ce,seed=0", "loss.name=la,seed=0"]
    assert all(isinstance(o, Outcome) and o.status == "finished" for o in done)
    for point in points:
        results = json.loads((point.out / "results.json").read_text())
        assert results["world_size"] == 2 and results["loss"] == point.name.split(",")[0][len("loss.name="):]


def test_checkpoint_in_the_signal_handler_sees_train_exit_at_once(tmp_path, monkeypatch):
    """submitit calls checkpoint() from a signal handler that interrupts TrainPoint's proc.wait(); it must see
    the child stop instead of waiting out STOP_WAIT_S (proc.poll() cannot answer there)."""
    import longtail.slurm as slurm

    monkeypatch.setattr(slurm, "STOP_WAIT_S", 30)
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "1")  # a one-task job environment, as inside a job
    child = "import signal, sys, time; signal.signal(signal.SIGUSR2, lambda *a: sys.exit(143)); time.sleep(60)"
    point = TrainPoint([sys.executable, "-c", child], str(tmp_path / "log"))
    waited = {}

    def preempt(*_):
        start = time.monotonic()
        point.checkpoint()
        waited["s"] = time.monotonic() - start

    previous = signal.signal(signal.SIGALRM, preempt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(RuntimeError, match="exited 143"):
            point()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert waited["s"] < slurm.STOP_WAIT_S / 2

