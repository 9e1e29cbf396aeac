"""`longtail predict` and the model.yaml it reads: named probabilities under a chosen prior, from model.pt and
model.yaml alone, with the run's evaluation transform."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fake_data import write_fashion_mnist
from longtail.cli import main
from longtail.config import DataConfig, load_config
from longtail.data import build_data
from longtail.data.idx import FASHION_MNIST_CLASSES
from longtail.data.listfile import Benchmark, build_listfile
from longtail.engine import collect_logits, eval_transform, fit, load_run
from longtail.errors import ConfigError
from longtail.predict import Predictor, format_prediction, image_paths, load_input
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [*TINY_MLP, "train.epochs=1"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A tiny CE run (logits calibrated to the training prior) and its first 12 test images as PNG files."""
    out = tmp_path_factory.mktemp("runs") / "ce"
    results = fit(load_config(None, TINY), out, data_root=str(data_root))
    images = out.parent / "images"
    images.mkdir()
    test = load_run(out, str(data_root)).data.test
    for i in range(12):
        Image.fromarray(test.images[i, 0].numpy()).save(images / f"{i:02d}.png")
    return data_root, out, images, results


def _expected_logits(out, root):
    loaded = load_run(out, str(root))
    z, _ = collect_logits(loaded.model, loaded.data.test, CPU)
    return z[:12].double(), loaded


def test_model_yaml_holds_everything_predict_needs(run):
    root, out, _, results = run
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["task"] == "single_label"
    assert spec["data"] == {"name": "fashion_mnist_lt", "class_names": FASHION_MNIST_CLASSES,
                            "class_counts": results["class_counts"]}
    assert spec["transform"] == {"kind": "as_is", "size": 28, "mean": [0.286], "std": [0.353], "tta": "none"}
    assert spec["folds"] == [] and spec["logit_prior"] == "train" and "ce" in spec["logit_prior_note"]


def test_probabilities_under_each_prior(run, tmp_path):
    root, out, images, _ = run
    z, loaded = _expected_logits(out, root)
    paths = sorted(images.glob("*.png"))
    predictor = Predictor(out, "uniform")
    x = torch.stack([load_input(p, predictor.spec) for p in paths])
    # The PNG round trip and the transform give exactly the evaluation input.
    assert torch.equal(x, loaded.data.test.to_input(loaded.data.test.images[:12], CPU, train=False))
    log_pi = torch.log(torch.tensor(loaded.data.class_counts, dtype=torch.float64) / sum(loaded.data.class_counts))
    target = torch.arange(1.0, 11.0, dtype=torch.float64)
    (tmp_path / "prior.txt").write_text("\n".join(f"{v:g}" for v in target.tolist()) + "\n")  # counts, normalised
    for prior, expected in [("uniform", z - log_pi), ("train", z),
                            (str(tmp_path / "prior.txt"), z + torch.log(target / target.sum()) - log_pi)]:
        got = Predictor(out, prior).probabilities(x)
        assert torch.allclose(got, expected.softmax(1), atol=1e-6), prior
    assert "--prior train: no correction" in Predictor(out, "train").note
    assert "z + log pi_uniform - log pi_train" in predictor.note


def test_cli_needs_only_model_pt_and_model_yaml(run, tmp_path):
    root, out, images, _ = run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.pt", "model.yaml"):
        shutil.copy(out / name, bare / name)
    env = {**os.environ, "LONGTAIL_DATA": str(tmp_path / "no-data-here")}
    cmd = [sys.executable, "-m", "longtail", "predict", str(bare / "model.pt"), str(images), "--topk", "3"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["input"] for r in records] == [str(p) for p in sorted(images.glob("*.png"))]
    z, _ = _expected_logits(out, root)
    counts = torch.tensor(yaml.safe_load((out / "model.yaml").read_text())["data"]["class_counts"], dtype=torch.float64)
    expected = (z - torch.log(counts / counts.sum())).softmax(1)  # default --prior uniform
    for record, probs in zip(records, expected):
        shown = [p["probability"] for p in record["predictions"]]
        assert shown == sorted(shown, reverse=True) and len(shown) == 3
        top = probs.topk(3)
        assert [p["id"] for p in record["predictions"]] == top.indices.tolist()
        assert shown == pytest.approx(top.values.tolist(), abs=1e-6)
        assert [p["class"] for p in record["predictions"]] == [FASHION_MNIST_CLASSES[k] for k in top.indices]
    assert "logit_prior train" in proc.stderr and "--prior uniform: z + log pi_uniform - log pi_train" in proc.stderr

    text = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == format_prediction(records[0])
    assert text.stdout.splitlines()[0].startswith(f"{images / '00.png'}: {records[0]['predictions'][0]['class']} ")


def test_inputs_are_images_folders_and_list_files(tmp_path):
    for rel in ("a/1.png", "a/b/2.JPG", "c.png", "a/.hidden/3.png", "a/.4.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "a/notes.md").write_text("not an image")
    (tmp_path / "list.txt").write_text(f"# comment\nc.png\n\n{tmp_path / 'a/1.png'}\n")
    assert image_paths([tmp_path / "a", tmp_path / "c.png", tmp_path / "list.txt"]) == [
        tmp_path / "a/1.png", tmp_path / "a/b/2.JPG", tmp_path / "c.png", tmp_path / "c.png", tmp_path / "a/1.png"]
    with pytest.raises(ConfigError, match="missing.png does not exist"):
        image_paths([tmp_path / "missing.png"])
    with pytest.raises(ConfigError, match=r"notes.md: not an image \(.jpg"):
        image_paths([tmp_path / "a/notes.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="a folder without image files"):
        image_paths([tmp_path / "empty"])


def test_bad_models_and_inputs_are_refused(run, tmp_path):
    _, out, images, _ = run
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(out / "model.pt", model / "model.pt")
    spec = yaml.safe_load((out / "model.yaml").read_text())
    for change, message in [({"task": "detection"}, "task 'detection' is unknown"),
                            ({"transform": {**spec["transform"], "kind": "crop"}}, "transform kind 'crop'")]:
        (model / "model.yaml").write_text(yaml.safe_dump({**spec, **change}))
        with pytest.raises(ConfigError, match=message):
            Predictor(model)
    older = {k: v for k, v in spec.items() if k not in ("transform", "logit_prior", "logit_prior_note", "task")}
    (model / "model.yaml").write_text(yaml.safe_dump({**older, "data": {"name": "fashion_mnist_lt"}}))
    with pytest.raises(ConfigError, match="no task, transform, logit_prior, logit_prior_note: written by an older"):
        Predictor(model)
    with pytest.raises(ConfigError, match="checkpoint.pt is not an exported model"):
        Predictor(out / "checkpoint.pt")

    predictor = Predictor(out)
    Image.new("L", (32, 28)).save(tmp_path / "big.png")
    with pytest.raises(ConfigError, match="32 x 28 pixels, but this model takes 28 x 28 images as they are"):
        list(predictor.predict([tmp_path / "big.png"]))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read image .*broken.png"):
        list(predictor.predict([tmp_path / "broken.png"]))
    # The Python API names its own arguments, and checks topk before it reads any image.
    with pytest.raises(ConfigError, match="topk=11: the model has 10 classes"):
        predictor.predict([tmp_path / "broken.png"], topk=11)
    with pytest.raises(ConfigError, match="prior='uniformm': not uniform, train, or an existing file"):
        Predictor(out, "uniformm")


@pytest.mark.parametrize("flags,message", [
    (["--topk", "11"], "--topk 11: the model has 10 classes; give 1..10"),
    (["--topk", "0"], "--topk 0: the model has 10 classes"),
    (["--prior", "uniformm"], "--prior uniformm: not uniform, train, or an existing file"),
    (["--threshold", "0.3"], "--threshold 0.3: a single-label model predicts its top classes under the prior"),
])
def test_the_command_names_its_flags(run, capsys, flags, message):
    _, out, images, _ = run
    assert main(["predict", str(out), str(images), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"longtail predict: error: {message}")


def test_a_bad_image_among_many_is_refused_naming_it_or_skipped_with_skip_bad(run, tmp_path, capsys):
    _, out, images, _ = run
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "05.png").write_bytes(b"not a png")
    Image.new("L", (32, 28)).save(folder / "07.png")  # readable, but not the model's 28 x 28
    assert main(["predict", str(out), str(folder), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before anything was predicted
    (line,) = captured.err.splitlines()
    assert f"cannot read image {folder / '05.png'}" in line and "(and 1 more of the 12 images)" in line
    assert "nothing was predicted: pass --skip-bad" in line

    assert main(["predict", str(out), str(folder), "--json", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    kept = [p for p in sorted(folder.glob("*.png")) if p.name not in ("05.png", "07.png")]
    assert [r["input"] for r in records] == [str(p) for p in kept]
    clean = {r["input"]: r for r in Predictor(out).predict(sorted(images.glob("*.png")))}
    for record in records:  # the same predictions as without the bad files (other batch: a tolerance)
        same = clean[str(images / Path(record["input"]).name)]["predictions"]
        assert [p["id"] for p in record["predictions"]] == [p["id"] for p in same]
        assert [p["probability"] for p in record["predictions"]] == pytest.approx(
            [p["probability"] for p in same], abs=1e-6)
    err = captured.err.splitlines()
    assert [line for line in err if line.startswith("skipped: ")] == [
        next(line for line in err if line.startswith(f"skipped: cannot read image {folder / '05.png'}: ")),
        f"skipped: {folder / '07.png'}: 32 x 28 pixels, but this model takes 28 x 28 images as they are "
        "(fashion_mnist_lt is not resized at evaluation); resize it first"]
    assert err[-1] == "--skip-bad: skipped 2 of 12 images"

    predictor = Predictor(out)  # the Python API: an error record in the bad image's place
    got = list(predictor.predict([folder / "05.png", folder / "00.png"], skip_bad=True))
    assert got[0] == {"input": str(folder / "05.png"), "error": got[0]["error"]}
    assert "cannot read image" in got[0]["error"] and "predictions" in got[1]
    assert predictor.unreadable(sorted(folder.glob("*.png")))[1][0] == folder / "07.png"


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["data"].update(class_names=s["data"]["class_names"][:9]),
     "data.class_names holds 9 entries for num_classes 10; give one per class"),
    (lambda s: s.update(num_classes="ten"), "num_classes: 'ten' is not a whole number in 1..1000000"),
    (lambda s: s.update(num_classes="1e11"), "num_classes: '1e11' is not a whole number"),  # YAML 1.1: a string
    (lambda s: s.update(num_classes=10**11), "num_classes: 100000000000 is not a whole number"),
    (lambda s: s.update(num_classes=12), "num_classes 12, but the model.pt beside it has a 10-class head"),
    (lambda s: s.update(image_size=10**6), "image_size: 1000000 is not a whole number in 1..8192"),
])
def test_an_edited_model_yaml_is_refused_before_anything_is_built(run, tmp_path, capsys, edit, message):
    from longtail.cli import main

    _, out, images, _ = run
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(out / "model.pt", model / "model.pt")
    spec = yaml.safe_load((out / "model.yaml").read_text())
    edit(spec)
    (model / "model.yaml").write_text(yaml.safe_dump(spec))
    assert main(["predict", str(model), str(images / "00.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{model / 'model.yaml'}: {message}" in err


def test_an_approximately_uniform_model_is_taken_as_uniform(run, tmp_path):
    root, out, images, _ = run
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(out / "model.pt", model / "model.pt")
    spec = yaml.safe_load((out / "model.yaml").read_text())
    (model / "model.yaml").write_text(yaml.safe_dump({**spec, "logit_prior": "approx_uniform",
                                                      "logit_prior_note": "loss cb weights classes"}))
    predictor = Predictor(model, "uniform")
    assert "logit_prior approx_uniform (loss cb weights classes), taken as uniform" in predictor.note
    assert "--prior uniform: no correction" in predictor.note
    z, _ = _expected_logits(out, root)
    x = torch.stack([load_input(p, spec) for p in sorted(images.glob("*.png"))])
    assert torch.allclose(predictor.probabilities(x), z.softmax(1), atol=1e-6)


def _write_folder(root, counts, test_per_class=2):
    """root/{train,test}/<class>/<i>.png, images of varied sizes whose colour depends on the class."""
    for split in ("train", "test"):
        for c, (name, n) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n if split == "train" else test_per_class):
                rng = np.random.default_rng(10 * c + i + (100 if split == "test" else 0))
                pixels = np.clip(60 * c + rng.integers(0, 60, (20 + 3 * i, 24 + 5 * c, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_files_get_the_runs_evaluation_transform(tmp_path, capsys):
    _write_folder(tmp_path / "d", {"ant": 8, "moth": 5, "zebra": 3})
    overrides = ["data.name=folder", f"data.root={tmp_path / 'd'}", "data.profile=none", "data.image_size=16",
                 "data.batch_size=8", "data.augment=none", "model.name=mlp", "model.width=8", "train.epochs=1"]
    fit(load_config(None, overrides), tmp_path / "run")
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["data"]["class_names"] == ["ant", "moth", "zebra"]
    assert spec["transform"] == {"kind": "resize_center_crop", "resize": 18, "size": 16, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "tta": "none"}
    run = load_run(tmp_path / "run")
    x, _, idx = next(run.data.test.batches(64, sampler=None))
    paths = [run.data.test.base / run.data.test.items.paths[i] for i in idx.tolist()]
    for path, row in zip(paths, x):
        assert torch.equal(load_input(path, spec), row)  # exactly the evaluation transform
    predictor = Predictor(tmp_path / "run", "train")
    z, _ = collect_logits(run.model, run.data.test, CPU)
    assert torch.allclose(predictor.probabilities(x), z.double().softmax(1), atol=1e-6)
    records = list(predictor.predict(paths, topk=3))
    assert all({p["class"] for p in r["predictions"]} == {"ant", "moth", "zebra"} for r in records)
    # A model of fewer than 5 classes: by default every class is shown, no --topk needed.
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), *map(str, paths[:2]), "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["predictions"]) for r in shown] == [3, 3]


def test_list_file_datasets_name_their_classes_from_a_file(tmp_path):
    tiny = Benchmark("tiny", "Tiny_LT", 3, {"train": ("train.txt", 6), "test": ("test.txt", 3)})
    base = tmp_path / "Tiny_LT"
    lines = {"train": [], "test": []}
    for c, n in enumerate([3, 2, 1]):
        for split, count in (("train", n), ("test", 1)):
            for i in range(count):
                (base / split).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (80 * c, 0, 0)).save(base / split / f"{c}_{i}.png")
                lines[split].append(f"{split}/{c}_{i}.png {c}")
    for split, rows in lines.items():
        (base / f"{split}.txt").write_text("\n".join(rows) + "\n")
    cfg = {"profile": "none", "image_size": 16}
    assert build_listfile(DataConfig(**cfg), tmp_path, tiny).class_names == ["0", "1", "2"]
    (base / "names.txt").write_text("tabby cat\ncrane\ncrane\n")  # ImageNet has two "crane" classes
    data = build_listfile(DataConfig(**cfg, class_names="names.txt"), tmp_path, tiny)
    assert data.class_names == ["tabby cat", "crane", "crane"]
    assert eval_transform(data, "flip")["tta"] == "flip"
    (base / "names.txt").write_text("tabby cat\ncrane\n")
    with pytest.raises(ConfigError, match="names.txt lists 2 names, but the dataset has 3 classes"):
        build_listfile(DataConfig(**cfg, class_names="names.txt"), tmp_path, tiny)
    with pytest.raises(ConfigError, match="data.class_names: .*nope.txt does not exist"):
        build_listfile(DataConfig(**cfg, class_names=str(tmp_path / "nope.txt")), tmp_path, tiny)
    _write_folder(tmp_path / "f", {"a": 2, "b": 2}, test_per_class=1)
    with pytest.raises(ConfigError, match="a folder dataset names its classes by their folders"):
        build_data(DataConfig(name="folder", root=str(tmp_path / "f"), class_names="names.txt"))
    write_fashion_mnist(tmp_path, train_per_class=5, test_per_class=1)
    with pytest.raises(ConfigError, match="fashion_mnist_lt has its own class names"):
        build_data(DataConfig(name="fashion_mnist_lt", class_names="names.txt"), tmp_path)
