"""Bad input at the command line, as a user types it: one line on stderr naming what is wrong and what is
accepted, exit 2, no traceback, and nothing of the user's overwritten or left half-written."""
import shutil

import pytest

from longtail.cli import main
from longtail.config import load_config
from longtail.engine import fit
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains one tiny run

TINY = [*TINY_MLP, "train.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "ce"
    fit(load_config(None, TINY), out, data_root=str(data_root))
    return out


def refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after any hint training printed first
    assert line.startswith(f"longtail {argv[0]}: error: ") and message in line, line


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_a_directory_in_the_way_of_a_result_file_is_named(run, tmp_path, capsys, data_root):
    out = copy_of(run, tmp_path)
    (out / "eval-test.json").mkdir()
    refused(capsys, ["eval", str(out), "--data-root", str(data_root)], f"{out / 'eval-test.json'}: it is a directory")
    assert not list(out.glob(".*.tmp"))


def test_a_file_in_the_way_of_a_directory_is_named(run, tmp_path, capsys, data_root):
    out = copy_of(run, tmp_path)
    (out / "figures").write_text("mine")
    refused(capsys, ["eval", str(out), "--plots", "--data-root", str(data_root)],
            f"{out / 'figures'} is a file, not a directory")
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    refused(capsys, ["train", "fashion_mnist_lt/ce", *TINY, "--out", str(blocker / "run"),
                     "--data-root", str(data_root)], f"{blocker} is a file, not a directory")
    refused(capsys, ["train", "fashion_mnist_lt/ce", *TINY, "--out", str(blocker), "--data-root", str(data_root)],
            f"{blocker} is a file, not a directory")
    refused(capsys, ["data", "fashion_mnist_lt", "imbalance=5", "--indices", str(blocker / "idx.txt"),
                     "--data-root", str(data_root)], f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "mine"


def test_a_new_run_never_writes_over_the_users_files(tmp_path, capsys, data_root):
    exp = tmp_path / "exp"
    exp.mkdir()
    mine = "# my experiment\nbase: fashion_mnist_lt/ce\ntrain:\n  epochs: 1\n"
    (exp / "config.yaml").write_text(mine)
    refused(capsys, ["train", str(exp / "config.yaml"), *TINY, "--out", str(exp), "--data-root", str(data_root)],
            f"holds a config.yaml written by hand (it has comments or a base: key), which a run would overwrite "
            f"with its own; give --out a directory of its own, e.g. {exp / 'run'}")
    refused(capsys, ["train", str(exp / "config.yaml"), *TINY, "--out", str(exp), "--resume",
                     "--data-root", str(data_root)], "holds a config.yaml written by hand")
    assert (exp / "config.yaml").read_text() == mine and sorted(p.name for p in exp.iterdir()) == ["config.yaml"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(capsys, ["train", "fashion_mnist_lt/ce", *TINY, "--out", str(other), "--data-root", str(data_root)],
            "is not empty and holds no run (notes.txt)")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_run_stopped_before_its_first_checkpoint_starts_over_only_for_its_own_config(tmp_path, capsys, data_root):
    out = tmp_path / "run"
    args = ["fashion_mnist_lt/ce", *TINY, "--out", str(out), "--data-root", str(data_root), "--quiet"]
    assert main(["train", *args]) == 0
    for name in ("checkpoint.pt", "results.json", "model.pt", "model.yaml"):  # as a kill before the checkpoint leaves it
        (out / name).unlink()
    saved = (out / "config.yaml").read_text()
    refused(capsys, ["train", *args, "train.seed=1"], "holds the config.yaml of another config that never reached a "
            "checkpoint (train.seed: 0 -> 1)")
    assert (out / "config.yaml").read_text() == saved
    assert main(["train", *args]) == 0 and (out / "results.json").exists()


def test_a_sweep_refuses_a_file_or_a_single_run_as_its_directory(run, tmp_path, capsys, data_root):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    grid = ["sweep", "fashion_mnist_lt/ce", *TINY, "--grid", "loss.name=[ce,la]", "--data-root", str(data_root)]
    refused(capsys, [*grid, "--out", str(blocker)], f"--out {blocker} is a file")
    out = copy_of(run, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    refused(capsys, [*grid, "--out", str(out)], f"--out {out} holds a single run")
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_output_file_is_replaced_only_with_overwrite(run, tmp_path, capsys, data_root):
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  name: cifar10_lt\n")
    refused(capsys, ["data", "fashion_mnist_lt", "imbalance=5", "--indices", str(mine), "--data-root", str(data_root)],
            f"--indices {mine} already exists; pass --overwrite to replace it")
    refused(capsys, ["report", str(run), "--html", str(mine)], f"--html {mine} already exists")
    refused(capsys, ["report", str(run), "--plot", str(mine)], f"--plot {mine} already exists")
    assert mine.read_text() == "data:\n  name: cifar10_lt\n"
    assert main(["data", "fashion_mnist_lt", "imbalance=5", "--indices", str(mine), "--overwrite", "--quiet",
                 "--data-root", str(data_root)]) == 0
    assert all(line.isdigit() for line in mine.read_text().splitlines())


@pytest.mark.parametrize("argv,message", [
    (["posthoc", "RUN", "--tau", "nan"], "argument --tau: expected a finite number, got nan"),
    (["posthoc", "RUN", "--tau", "inf"], "argument --tau: expected a finite number, got inf"),
    (["posthoc", "RUN", "--tau", "-1"], "argument --tau: expected a number >= 0, got -1"),
    (["train", "fashion_mnist_lt/ce", "--out", ""], "argument --out: expected a value, got an empty string"),
    (["eval", "RUN", "--data-root", " "], "argument --data-root: expected a value"),
])
def test_flags_refuse_values_that_would_silently_mean_something_else(run, capsys, argv, message):
    argv = [str(run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_reproduce_refuses_flags_that_would_do_nothing(tmp_path, capsys):
    refused(capsys, ["reproduce", "wb", "--from", str(tmp_path), "--out", str(tmp_path / "x")],
            "--from shows runs that exist and runs nothing, so --out would do nothing")
    refused(capsys, ["reproduce", "wb", "--list"], "--list lists every table; leave out the table name (wb)")
    (tmp_path / "afile").write_text("mine")
    refused(capsys, ["reproduce", "wb", "--from", str(tmp_path / "afile")], "afile: not a directory")


def test_a_broken_model_file_is_not_called_a_checkpoint_to_restart_without(run, tmp_path, capsys, data_root):
    out = copy_of(run, tmp_path)
    (out / "model.pt").write_bytes((out / "model.pt").read_bytes()[:1000])
    refused(capsys, ["eval", str(out), "--data-root", str(data_root)],
            f"model file {out / 'model.pt'} is truncated or corrupt (1000 bytes, not a complete zip archive")
    refused(capsys, ["train", "fashion_mnist_lt/ce", *TINY, f"method.init_from={out}", "--out", str(tmp_path / "x"),
                     "--data-root", str(data_root)], "method.init_from: model file")
    assert "restart without it" not in capsys.readouterr().err


def test_a_model_that_does_not_fit_its_model_yaml_is_one_line(run, tmp_path, capsys, data_root):
    out = copy_of(run, tmp_path)
    other = tmp_path / "wide"
    fit(load_config(None, [*TINY, "model.width=16"]), other, data_root=str(data_root))
    shutil.copy(other / "model.pt", out / "model.pt")
    refused(capsys, ["eval", str(out), "--data-root", str(data_root)],
            "model.pt does not fit the architecture in model.yaml (mlp): size mismatch for")


@pytest.mark.parametrize("key,good,bad,message", [
    ("model.name", "mlp", "resnet99", "model.name: unknown model 'resnet99'; registered models:"),
    ("model.name", "mlp", "nosuchmod:factory", "model.name: cannot import module 'nosuchmod'"),
    ("train.device", "cpu", "banana", "train.device: 'banana' is not a device; use auto, cpu, cuda or cuda:N"),
])
def test_config_refuses_what_train_would_before_a_sweep_runs_a_point(tmp_path, capsys, key, good, bad, message):
    refused(capsys, ["config", "fashion_mnist_lt/ce", f"{key}={bad}"], message)
    refused(capsys, ["sweep", "fashion_mnist_lt/ce", "--grid", f"{key}=[{good},{bad}]", "--out", str(tmp_path / "s")],
            message)
    assert not (tmp_path / "s").exists()


def test_a_directory_given_as_a_config_is_named_as_one(tmp_path, capsys):
    refused(capsys, ["config", str(tmp_path)], f"config file {tmp_path} is a directory; expected a YAML file")


@pytest.mark.parametrize("text,message", [
    ("data: {name: x\n", "expected ',' or '}', but got '<stream end>' (line 2, column 1)"),
    ("data:\n\tname: x\n", "found character '\\t' that cannot start any token (line 2, column 1)"),
    ("a: b: c\n", "mapping values are not allowed here (line 1, column 5)"),
])
def test_invalid_yaml_is_one_line_saying_what_and_where(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    refused(capsys, ["config", str(bad)], f"config file {bad} is not valid YAML: ")
    refused(capsys, ["config", str(bad)], message)


def test_a_model_width_below_one_is_refused_by_config_as_by_train(capsys):
    refused(capsys, ["config", "fashion_mnist_lt/ce", "model.width=0"], "model.width: must be > 0, got 0")


def test_a_missing_config_names_only_what_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("the following arguments are required: config")
