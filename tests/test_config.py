import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longtail.config import Config, apply_overrides, from_dict, load_config, resolve_epochs, save_config
from longtail.errors import ConfigError

# configs/tables/ holds paper tables, not run configs (tests/test_reproduce.py checks each of their rows).
CONFIGS = sorted(p for p in Path(__file__).parents[1].glob("configs/*/*.yaml") if p.parent.name != "tables")


def test_defaults_are_the_ldam_drw_recipe():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.data.batch_size) == (0.1, 0.9, 2e-4, 128)
    assert cfg.schedule.milestones == [0.8, 0.9] and cfg.schedule.gamma == 0.01
    assert cfg.eval.select == "final" and cfg.eval.ece_bins == 15


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path):
    load_config(path)


def test_overrides_are_typed_yaml_values():
    cfg = load_config(None, ["train.epochs=5", "optim.lr=0.05", "schedule.milestones=[0.5, 0.75]", "model.pretrained=null"])
    assert cfg.train.epochs == 5 and cfg.optim.lr == 0.05 and cfg.schedule.milestones == [0.5, 0.75]
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=5", ["train.epoch", "known keys", "epochs"]),
        ("trian.epochs=5", ["trian", "known keys"]),
        ("train.epochs=five", ["train.epochs", "integer"]),
        ("loss.name=softmax", ["loss.name", "softmax", "ce, cb, focal, ldam, la, bs, bce"]),
        ("data.batch_size=0", ["data.batch_size", "> 0"]),
        ("train.amp=maybe", ["train.amp", "true or false"]),
        ("more.rank_ratio=2", ["more.rank_ratio", "(0, 1]"]),
        ("schedule.milestones=[-0.1, 0.9]", ["schedule.milestones", ">= 0"]),
        ("trainepochs", ["section.key=value"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["loss.name=la", "more.enabled=true"])
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(raw) == {"data", "model", "loss", "method", "more", "finetune", "posthoc", "optim", "schedule", "train", "eval"}
    assert from_dict(raw) == cfg


def test_fractions_scale_with_training_length():
    assert resolve_epochs(0.8, 200) == 160 and resolve_epochs(0.8, 10) == 8 and resolve_epochs(30, 10) == 30


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["more.enabled=true"]) == {"more": {"enabled": True}}


def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: -3\n")
    proc = subprocess.run([sys.executable, "-m", "longtail", "train", str(bad), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.epochs: must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_posthoc_on_a_cosine_head_is_refused_before_training():
    with pytest.raises(ConfigError, match="cosine head"):
        load_config(None, ["model.head=cosine", "posthoc.kind=multiplicative", "posthoc.tau=1.0"])


def test_exponent_without_a_dot_is_a_number():
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_cli_takes_overrides_after_options(tmp_path, capsys):
    from longtail.cli import main

    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--bogus"])
    # The override after --json reaches the config: the missing-data error names its directory.
    assert main(["data", "cifar10_lt", "--json", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_saved_files_are_readable_by_others(tmp_path):
    import os
    import stat

    save_config(Config(), tmp_path / "config.yaml")
    mode = stat.S_IMODE(os.stat(tmp_path / "config.yaml").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_no_config_key_is_declared_twice():
    # A second declaration silently replaces the first's default and comment (data.class_names had two).
    import ast
    from pathlib import Path

    import longtail.config.schema as schema

    tree = ast.parse(Path(schema.__file__).read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)]
        assert len(names) == len(set(names)), f"{cls.name} declares {sorted({n for n in names if names.count(n) > 1})} twice"


@pytest.mark.parametrize("command", ["train", "config", "data", "reproduce"])
def test_a_config_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys, command):
    from longtail.cli import main

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  epochs: 5  # d\u00e9j\u00e0 vu\n".encode("latin-1"))
    out = tmp_path / "out"
    args = [command, str(latin1)] + (["--out", str(out)] if command in ("train", "reproduce") else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"longtail {command}: error: config file {latin1} is not a UTF-8 text (YAML) file: line 2" in err
    assert not out.exists()


def test_a_base_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "base.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'base.yaml'} is not a UTF-8 text"):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize("override, key", [
    ("data.imbalance=.nan", "data.imbalance"),  # passed ">= 1", then int(nan) crashed building the subset
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),  # passed "> 0", then the run diverged
    ("loss.tau=.inf", "loss.tau"),
    ("optim.weight_decay=-.inf", "optim.weight_decay"),
    ("optim.lr=nan", "optim.lr"),  # a string that float() reads as NaN
    ("optim.lr=Infinity", "optim.lr"),
    ("loss.drw_start=.nan", "loss.drw_start"),  # a number or null
    ("schedule.milestones=[0.5, .nan]", r"schedule.milestones\[1\]"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected a finite number, got -?(nan|inf)$"):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("posthoc.tau=-0.5", r"^posthoc\.tau: must be >= 0, got -0\.5$"),
    ("method.tau_norm_tau=-1", r"^method\.tau_norm_tau: must be >= 0, got -1\.0$"),
    ("posthoc.grid=[-1, 2, 0.05]", r"^posthoc\.grid: expected \[start, stop, step\] with 0 <= start <= stop"),
])
def test_a_negative_tau_is_refused_naming_the_key(override, message):
    # It would move the logits toward the frequent classes: the opposite of what every adjustment is for.
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    load_config(None, [override.replace("-", "")])  # the same value >= 0 loads


def test_config_refuses_a_nan_it_used_to_print(tmp_path, capsys):
    from longtail.cli import main

    assert main(["config", "cifar10_lt/ce", "data.imbalance=.nan"]) == 2
    captured = capsys.readouterr()
    assert "longtail config: error: data.imbalance: expected a finite number, got nan" in captured.err
    assert captured.out == ""
    nan_file = tmp_path / "nan.yaml"
    nan_file.write_text(f"optim:\n  lr: .nan\ndata:\n  root: {tmp_path / 'none'}\n")  # no data: never trains
    assert main(["train", str(nan_file), "--out", str(tmp_path / "run")]) == 2
    assert "optim.lr: expected a finite number" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_key_given_twice_in_a_file_is_refused_naming_the_file_key_and_lines(tmp_path, capsys):
    from longtail.cli import main

    twice = tmp_path / "twice.yaml"
    # No data there: a run that got past the config would stop at once instead of training.
    twice.write_text(f"data:\n  name: fashion_mnist_lt\n  name: cifar10_lt\n  root: {tmp_path / 'none'}\n")
    assert main(["train", str(twice), "--out", str(tmp_path / "run")]) == 2
    assert (f"longtail train: error: config file {twice} is not valid YAML: key 'name' is given twice in one mapping, "
            "on lines 2 and 3; keep one") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.2\noptim:\n  momentum: 0.8\n")  # a section twice
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'base.yaml'} .*key 'optim' .*lines 1 and 3"):
        load_config(tmp_path / "child.yaml")


def test_a_key_that_overrides_a_yaml_merge_is_no_duplicate(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("optim:\n  <<: {lr: 0.2, momentum: 0.8}\n  lr: 0.05\n")
    cfg = load_config(merged)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.05, 0.8)
