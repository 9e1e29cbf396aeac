"""Settings a user can find: recipes by name (`longtail configs`), `base:` inheritance, `longtail config`,
the suggestions for a mistyped key or a dashed override, schedules that cannot mean two things, and a second
run of a recipe that does not collide with the first."""
from pathlib import Path

import pytest
import yaml

from longtail.cli import main
from longtail.config import Config, find_recipe, load_config
from longtail.config.recipes import list_recipes, recipes_dir
from longtail.errors import ConfigError
from longtail.training.optim import describe_schedule
from tiny import TINY_MLP


def test_a_recipe_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = recipes_dir() / "cifar10_lt" / "ldam_drw.yaml"
    for name in ("cifar10_lt/ldam_drw", "cifar10_lt/ldam_drw.yaml", "configs/cifar10_lt/ldam_drw.yaml"):
        assert find_recipe(name) == shipped
    assert load_config("cifar10_lt/ldam_drw").loss.name == "ldam"
    with pytest.raises(ConfigError, match="no shipped recipe is named 'cifar10_lt/nope'.*longtail configs"):
        load_config("cifar10_lt/nope")


def test_a_mistyped_recipe_name_gets_the_closest_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "cifar10_lt/ldam_drww", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert ("no shipped recipe is named 'cifar10_lt/ldam_drww'; did you mean cifar10_lt/ldam_drw? `longtail configs` "
            "lists the recipes") in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"did you mean cifar100_lt/ldam_drw\?"):  # not cifar100_lt/la
        load_config("configs/cifar100_lt/ldam.yaml")
    with pytest.raises(ConfigError, match="'my_config.yaml'; `longtail configs`"):  # nothing close: no guess
        load_config("my_config.yaml")


def test_a_file_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10_lt").mkdir()
    (tmp_path / "cifar10_lt" / "ce.yaml").write_text("loss: {name: focal}\n")
    assert load_config("cifar10_lt/ce.yaml").loss.name == "focal"
    assert load_config("cifar10_lt/ce").loss.name == "ce"  # no file of that name here: the shipped recipe


def test_configs_lists_the_recipes_with_their_first_comment_line(capsys):
    assert main(["configs", "ldam"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "cifar10_lt/ldam_drw" in names and all("ldam" in n for n in names)
    first_comment = (recipes_dir() / "cifar10_lt" / "ldam_drw.yaml").read_text().splitlines()[0].lstrip("# ")
    assert any(line.startswith("cifar10_lt/ldam_drw ") and line.endswith(first_comment) for line in lines)
    assert not any(n.startswith("tables/") for n, _ in list_recipes())
    assert main(["configs", "no_such_recipe"]) == 2


def test_base_lays_a_recipe_over_another(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.2, momentum: 0.8}\ntrain: {epochs: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.05}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.05, 0.8, 7)
    (tmp_path / "named.yaml").write_text("base: cifar10_lt/ldam_drw\ntrain: {epochs: 3}\n")  # a recipe name
    named = load_config(tmp_path / "named.yaml")
    assert (named.loss.name, named.train.epochs) == ("ldam", 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherit from itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="bad.yaml: base: expected a recipe name"):
        load_config(tmp_path / "bad.yaml")


def test_a_missing_base_names_the_file_that_refers_to_it_and_where_it_was_looked_for(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    child = tmp_path / "child.yaml"
    child.write_text("base: sub/middle.yaml\n")
    middle = tmp_path / "sub" / "middle.yaml"
    middle.write_text("base: nonexistent.yaml\n")
    assert main(["config", str(child)]) == 2
    captured = capsys.readouterr()
    assert (f"longtail config: error: {middle}: base: nonexistent.yaml does not exist as "
            f"{(tmp_path / 'sub' / 'nonexistent.yaml').resolve()} (a base path is relative to the folder of the file "
            "that names it), and no shipped recipe is named 'nonexistent.yaml'") in captured.err
    assert captured.out == ""
    middle.write_text("base: cifar10_lt/ldam_drww\n")
    with pytest.raises(ConfigError, match=r"middle.yaml: base: cifar10_lt/ldam_drww does not exist as .*did you mean "
                                          r"cifar10_lt/ldam_drw\?"):
        load_config(child)


def test_shipped_recipes_that_use_base_resolve_to_what_they_spelled_out():
    for dataset in ("cifar10_lt", "cifar100_lt", "fashion_mnist_lt"):
        la = recipes_dir() / dataset / "la.yaml"
        assert yaml.safe_load(la.read_text())["base"] == "ce.yaml"
        resolved, ce = load_config(la).to_dict(), load_config(recipes_dir() / dataset / "ce.yaml").to_dict()
        ce["loss"].update(name="la", tau=1.0)
        assert resolved == ce


def test_config_prints_the_resolved_settings_and_the_diff(capsys):
    assert main(["config", "cifar10_lt/ldam_drw", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("cifar10_lt/ldam_drw", ["train.epochs=3"]).to_dict()
    assert list(printed) == list(Config().to_dict())  # the nesting of a run's config.yaml
    assert main(["config", "cifar10_lt/ldam_drw", "train.epochs=3", "--diff"]) == 0
    diff = yaml.safe_load(capsys.readouterr().out)
    assert diff["train"] == {"epochs": 3} and diff["loss"]["name"] == "ldam" and "optim" not in diff
    assert main(["config", "cifar10_lt/ldam_drw", "train.warmup=1"]) == 2


@pytest.mark.parametrize("override, suggested", [
    ("train.warmup=1", "did you mean schedule.warmup_epochs?"),
    ("data.imbalanse=5", "did you mean data.imbalance?"),
    ("train.lr=0.1", "did you mean optim.lr?"),
    ("trian.epochs=1", "did you mean train?"),
])
def test_an_unknown_key_gets_the_closest_known_ones(override, suggested):
    with pytest.raises(ConfigError, match=f"unknown key.*{suggested}"):
        load_config(None, [override])


def test_a_dashed_override_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "cifar10_lt/ce", "--train.epochs=1"])
    assert stop.value.code == 2
    assert "overrides take no dashes: write train.epochs=1" in capsys.readouterr().err


def test_version_and_train_help_point_to_the_settings(capsys):
    from longtail import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"longtail {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "longtail config RECIPE" in text and "docs/config.md" in text


@pytest.mark.parametrize("milestones, problem", [("[0.5,1.0]", "mixes fractions"), ("[0.9,0.8]", "increasing"),
                                                 ("[160,160]", "increasing")])
def test_milestones_that_could_mean_two_things_are_refused(milestones, problem):
    with pytest.raises(ConfigError, match=f"schedule.milestones.*{problem}.*end of training needs no milestone"):
        load_config(None, [f"schedule.milestones={milestones}"])
    assert load_config(None, ["schedule.milestones=[160,180]"]).schedule.milestones == [160, 180]


def test_the_schedule_is_described_in_words():
    text = describe_schedule(load_config("cifar10_lt/ldam_drw"))
    assert text == "lr 0.1, warm-up 5 epochs, x0.01 after epochs 160, 180, class re-weighting (DRW) after epoch 160"


@pytest.mark.e2e
def test_a_second_run_of_a_recipe_is_pointed_to_a_free_directory(tmp_path, monkeypatch, data_root, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY_MLP, "train.epochs=1"]
    assert main(["train", "fashion_mnist_lt/ce", *tiny, "data.root=data", "--data-root", str(data_root)]) == 0
    out = tmp_path / "runs" / "fashion_mnist_lt" / "ce"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tmp_path / "data")  # stored resolved, so eval works from anywhere
    assert "(schedule: lr 0.05, warm-up 0.025 epochs, x0.01 after epochs 1, 1)" in capsys.readouterr().out

    (tmp_path / "runs" / "fashion_mnist_lt" / "ce-2").mkdir()  # taken: the advice skips it
    assert main(["train", "fashion_mnist_lt/ce", *tiny, "train.seed=1", "--data-root", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config (train.seed: 0 -> 1)" in err and "--out runs/fashion_mnist_lt/ce-3" in err
    assert "--resume" not in err
    assert main(["train", "fashion_mnist_lt/ce", *tiny, "--data-root", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of this config; pass --resume" in err
    assert main(["train", "fashion_mnist_lt/ce", *tiny, "train.seed=1", "--resume", "--data-root",
                 str(data_root)]) == 2
    assert "--out runs/fashion_mnist_lt/ce-3 and no --resume" in capsys.readouterr().err


def test_models_lists_every_backbone_and_head(capsys):
    from longtail.models import MODELS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  or ")}
    assert listed == set(MODELS) | {"linear", "cosine", "etf"}
    hf = [line for line in out.splitlines() if line.split()[:1] in (["hf_clip"], ["hf_vit"])]
    assert len(hf) == 2 and all("hub id" in line and "--download-weights" in line for line in hf)


def test_the_documented_resnet_key_layout_is_the_backbones(tmp_path):
    """docs/large_datasets.md's table of names, spelled out for resnet50, is what `model.pretrained` loads."""
    import re

    import torch

    from longtail.config import ModelConfig
    from longtail.models import build_model

    doc = (Path(__file__).resolve().parents[1] / "docs" / "large_datasets.md").read_text()
    assert "torchvision.models" not in doc and "`layer{S}.0.downsample.0.weight`" in doc
    names = ["conv1.weight", *(f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var"))]
    for stage, blocks in enumerate((3, 4, 6, 3), 1):
        for block in range(blocks):
            for k in (1, 2, 3):
                bn = f"layer{stage}.{block}.bn{k}"
                names += [f"layer{stage}.{block}.conv{k}.weight",
                          *(f"{bn}.{p}" for p in ("weight", "bias", "running_mean", "running_var"))]
        names += [f"layer{stage}.0.downsample.0.weight",
                  *(f"layer{stage}.0.downsample.1.{p}" for p in ("weight", "bias", "running_mean", "running_var"))]
    model = build_model(ModelConfig(name="resnet50"), 10, 3, 64)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert set(names) == {k for k in own if not re.search(r"num_batches_tracked$", k)}
    torch.save({f"module.{k}": own[k] for k in names} | {"module.fc.weight": torch.zeros(10, 2048)},
               tmp_path / "r50.pth")
    build_model(ModelConfig(name="resnet50", pretrained=str(tmp_path / "r50.pth")), 10, 3, 64)  # loads: no error
