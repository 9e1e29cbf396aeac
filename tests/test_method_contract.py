"""Every method in the registry, through a whole run: it trains (or not), finalizes, exports model.pt +
model.yaml, and the exported model reloads and scores what results.json recorded. Parametrised over
`longtail.methods.METHODS`, so a method added there is covered without editing this file."""
import json

import pytest
import torch
import yaml

from longtail.config import HEAD_ONLY_METHODS, load_config
from longtail.engine import evaluate_run, fit, load_run
from longtail.methods import METHODS, training_folds
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e

ONE_EPOCH = [*TINY_MLP, "train.epochs=1", "data.val_per_class=2"]
# What each method needs besides the tiny run; the second stages (HEAD_ONLY_METHODS) start from the
# `stage1` run's model.pt.
NEEDS = {"ewb": ["model.head=etf"], "tau_norm": ["method.tau_norm_tau=1.0"]}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("stage1") / "run"
    fit(load_config(None, ONE_EPOCH), out, data_root=data_root)
    return out


def _zero_shot_run(tmp_path, clip):
    from fake_data import write_cifar10

    write_cifar10(tmp_path / "data", train_per_class=4, test_per_class=2)
    overrides = ["data.name=cifar10_lt", "data.imbalance=2", "data.batch_size=8", "eval.batch_size=16",
                 "model.name=hf_clip", f"model.pretrained={clip}", "model.head=cosine",
                 "model.head_init=text", "method.name=zero_shot", "train.epochs=1"]
    return load_config(None, overrides), tmp_path / "data"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_finalizes_exports_and_reloads(name, tmp_path, data_root, request):
    if name == "zero_shot":  # CLIP's text tower names the classes: a tiny CLIP on fake CIFAR-10
        cfg, root = _zero_shot_run(tmp_path, request.getfixturevalue("clip_dir")[0])
    else:
        stage = [f"method.init_from={request.getfixturevalue('stage1')}"] if name in HEAD_ONLY_METHODS else []
        cfg, root = load_config(None, [*ONE_EPOCH, f"method.name={name}", *stage, *NEEDS.get(name, [])]), data_root
    out = tmp_path / "run"
    results = fit(cfg, out, data_root=root)

    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["folds"] == training_folds(cfg, results["method_record"] or {})
    run = load_run(out, data_root=root)
    exported = torch.load(out / "model.pt", weights_only=True)
    assert list(run.model.state_dict()) == list(exported)  # the architecture model.yaml describes
    again = evaluate_run(out, data_root=root)  # same process, same function: the same numbers
    assert again["top1"] == results["top1"] and again["balanced"] == results["balanced"]
    assert json.loads((out / "results.json").read_text())["method"] == name
