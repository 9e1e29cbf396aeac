"""One writer per run directory, one consistent set of files per result: the run directory's lock (refused at
once, gone with its process), posthoc's all-or-nothing switch, --overwrite, and stale temporaries removed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from longtail.checkpoint import new_directory, replace_directory, run_lock
from longtail.cli import main
from longtail.config import load_config
from longtail.engine import fit
from longtail.errors import ConfigError
from longtail.methods import posthoc
from tiny import TINY_MLP

TINY = [*TINY_MLP, "data.val_per_class=5", "train.epochs=1", "eval.batch_size=256"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "plain"
    fit(load_config(None, TINY), out, data_root=data_root)
    return out


def _files(directory: Path) -> dict:
    """Every file under `directory` but the lock file, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.yaml", "model.pt", "model.yaml", "results.json"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


def _config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("")
    return str(path)


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from longtail.checkpoint import run_lock
        with run_lock({str(directory)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


# ----------------------------------------------------------------------------- the lock


def test_a_second_train_into_a_held_directory_is_refused_at_once_and_writes_nothing(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        code = main(["train", _config(tmp_path), "--out", str(out), "--data-root", str(data_root), *TINY])
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and str(out) in err and f"pid {holder.pid}" in err, err
        assert sorted(p.name for p in out.iterdir()) == before == [".lock"]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", [["eval"], ["eval", "--plots"], ["analyze"], ["posthoc", "--tau", "1"],
                                     ["export", "--format", "safetensors"], ["train", "--resume"]])
def test_every_command_that_writes_into_a_run_directory_is_refused_while_another_holds_it(
        tmp_path, finished, data_root, capsys, command):
    before = _files(finished)
    with run_lock(finished):
        if command[0] == "train":
            args = ["train", _config(tmp_path), *TINY, "--out", str(finished), *command[1:]]
        else:
            args = [command[0], str(finished), *command[1:]]
        if command[0] != "export":
            args += ["--data-root", str(data_root)]
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and f"{finished} is in use by another longtail command (pid {os.getpid()})" in err, err
    assert err.count("\n") == 1
    assert _files(finished) == before


def test_a_sigkilled_holder_does_not_block_the_next_command(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        with run_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path):  # at once: the lock died with its process
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    # A DataLoader worker is a forked child: the run's lock must die with the run, not with its last worker.
    code = textwrap.dedent(f"""
        import os, time
        from longtail.checkpoint import run_lock
        with run_lock({str(tmp_path)!r}):
            if os.fork() == 0:
                print(os.getpid(), flush=True)  # once fork has returned here, its hooks have run
                time.sleep(60)
                os._exit(0)
            time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        os.kill(child, 0)  # still running
        with run_lock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_refused_train_into_a_new_directory_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "new"
    code = main(["train", _config(tmp_path), "--out", str(out), "data.name=no_such_dataset"])
    assert code == 2 and "no_such_dataset" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- posthoc: all or nothing


def _posthoc(run, tau, data_root, *extra):
    return main(["posthoc", str(run), "--kind", "additive", "--tau", str(tau), "--data-root", str(data_root), *extra])


def test_a_second_posthoc_is_refused_naming_overwrite_and_overwrite_replaces_the_set(tmp_path, finished, data_root,
                                                                                   capsys):
    run = _copy(finished, tmp_path / "run")
    assert _posthoc(run, 1.0, data_root) == 0
    out = run / "posthoc-additive"
    first = _files(out)
    capsys.readouterr()
    assert _posthoc(run, 0.5, data_root) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a post-hoc result; pass --overwrite" in err and err.count("\n") == 1
    assert _files(out) == first
    assert _posthoc(run, 0.5, data_root, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["posthoc"]["tau"] == 0.5
    assert yaml.safe_load((out / "model.yaml").read_text())["folds"][-1]["tau"] == 0.5
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]  # nothing left aside


def test_posthoc_stopped_between_its_files_leaves_the_old_set_whole(tmp_path, finished, data_root, monkeypatch):
    run = _copy(finished, tmp_path / "run")
    assert _posthoc(run, 1.0, data_root) == 0
    out = run / "posthoc-additive"
    first = _files(out)

    real = posthoc.export_model

    def stopped_after_model(*args, **kwargs):  # as SIGTERM after model.pt and model.yaml, before results.json
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(posthoc, "export_model", stopped_after_model)
    assert _posthoc(run, 0.5, data_root, "--overwrite") == 130
    assert _files(out) == first  # model.pt, model.yaml, results.json: all tau 1.0
    assert (run / ".posthoc-additive.new" / "model.pt").exists()  # the abandoned half of the new set
    monkeypatch.undo()
    assert main(["eval", str(run), "--data-root", str(data_root)]) == 0  # the next command holding the run's lock clears it away
    assert not (run / ".posthoc-additive.new").exists()
    assert _files(out) == first


def test_a_replacement_killed_between_its_renames_is_completed_by_the_next_lock_holder(tmp_path):
    target = tmp_path / "result"
    target.mkdir()
    (target / "a").write_text("old")
    new = new_directory(target)
    (new / "a").write_text("new")
    os.rename(target, tmp_path / ".result.old")  # killed here, after the first of replace_directory's renames
    assert not target.exists()
    with run_lock(tmp_path):
        pass
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "result"]

    new = new_directory(target)
    (new / "a").write_text("newer")
    replace_directory(target)
    assert (target / "a").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == [".lock", "result"]


# ----------------------------------------------------------------------------- export and analyze


def test_export_refuses_an_existing_file_without_overwrite(finished, capsys):
    pytest.importorskip("safetensors")
    target = finished / "model.safetensors"
    target.write_bytes(b"someone else's file")
    try:
        assert main(["export", str(finished), "--format", "safetensors"]) == 2
        err = capsys.readouterr().err
        assert f"{target} already exists; pass --overwrite" in err and err.count("\n") == 1
        assert target.read_bytes() == b"someone else's file"
        stale = finished / ".model.safetensors.k2j3h4x9.tmp"  # left by a SIGTERM inside the atomic write
        stale.write_bytes(b"half")
        assert main(["export", str(finished), "--format", "safetensors", "--overwrite"]) == 0
        assert target.read_bytes()[:8] != b"someone " and not stale.exists()
    finally:
        target.unlink()


def test_analyze_and_eval_plots_remove_their_stale_temporaries(finished, data_root):
    stale = [finished / ".analysis.json.a1b2c3d4.tmp", finished / "figures" / ".norms.png.a1b2c3d4.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    assert main(["analyze", str(finished), "--data-root", str(data_root)]) == 0
    assert not any(path.exists() for path in stale)
    figure = finished / "figures" / ".per_class-test.png.a1b2c3d4.tmp"
    figure.write_bytes(b"half")
    assert main(["eval", str(finished), "--plots", "--data-root", str(data_root)]) == 0
    assert not figure.exists()
