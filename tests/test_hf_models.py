"""hf_clip / hf_vit: loading hub-format checkpoints by path, clear errors, model.yaml without the checkpoint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fake_data import write_cifar10
from hf_tiny import write_clip
from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.models import build_model

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

transformers = pytest.importorskip("transformers")

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def model_cfg(name, pretrained, *extra):
    return load_config(None, [f"model.name={name}", f"model.pretrained={pretrained}", *extra]).model


def test_clip_features_are_the_projected_image_embedding(clip_dir):
    path, reference = clip_dir
    model = build_model(model_cfg("hf_clip", path), num_classes=10).eval()
    assert model.feature_dim == 16
    with torch.no_grad():
        expected = reference.visual_projection(reference.vision_model(pixel_values=X).pooler_output)
        assert torch.allclose(model.features(X), expected, atol=1e-5)


def test_vit_features_are_the_normed_cls_token_not_the_pooler(vit_dir):
    path, reference = vit_dir
    model = build_model(model_cfg("hf_vit", path), num_classes=10).eval()
    with torch.no_grad():
        out = reference(pixel_values=X)
        assert torch.allclose(model.features(X), out.last_hidden_state[:, 0], atol=1e-5)
        assert not torch.allclose(model.features(X), out.pooler_output, atol=1e-3)
    assert not any(k.startswith("net.pooler") for k in model.state_dict())


def test_other_image_sizes_interpolate_position_embeddings(vit_dir):
    model = build_model(model_cfg("hf_vit", vit_dir[0]), num_classes=4, image_size=48)
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 4)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_files_are_named(vit_dir, tmp_path):
    bad = copy_checkpoint(vit_dir[0], tmp_path / "a")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"a/model\.safetensors does not exist"):
        build_model(model_cfg("hf_vit", bad), num_classes=4)
    (bad / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"a/config\.json does not exist"):
        build_model(model_cfg("hf_vit", bad), num_classes=4)


def test_shape_mismatch_names_the_file_and_key(clip_dir, tmp_path):
    bad = copy_checkpoint(clip_dir[0], tmp_path / "b")
    config = json.loads((bad / "config.json").read_text())
    config["projection_dim"] = 24
    (bad / "config.json").write_text(json.dumps(config))
    message = r"b/model\.safetensors: visual_projection\.weight has shape \(16, 32\), .* needs \(24, 32\)"
    with pytest.raises(ConfigError, match=message):
        build_model(model_cfg("hf_clip", bad), num_classes=4)


def test_missing_and_unknown_keys_are_named(vit_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_checkpoint(vit_dir[0], tmp_path / "c")
    state = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "layernorm.weight"}, bad / "model.safetensors")
    with pytest.raises(ConfigError, match=r"c/model\.safetensors lacks .*layernorm\.weight"):
        build_model(model_cfg("hf_vit", bad), num_classes=4)
    save_file({**state, "extra.weight": torch.zeros(2)}, bad / "model.safetensors")
    with pytest.raises(ConfigError, match=r"c/model\.safetensors holds extra\.weight"):
        build_model(model_cfg("hf_vit", bad), num_classes=4)


def test_a_hub_id_outside_the_cache_is_never_downloaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="--download-weights"):
        build_model(model_cfg("hf_clip", "nobody-here/no-such-clip-model"), num_classes=4)


def test_normalisation_from_the_preprocessor_config_else_clips(clip_dir, tmp_path):
    from longtail.models.hf import CLIP_MEAN, CLIP_STD, normalisation

    assert normalisation(model_cfg("hf_clip", clip_dir[0])) == (CLIP_MEAN, CLIP_STD)
    own = copy_checkpoint(clip_dir[0], tmp_path / "d")
    (own / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    assert normalisation(model_cfg("hf_clip", own)) == ([0.5] * 3, [0.25] * 3)


def test_the_core_does_not_import_transformers():
    code = "import sys, longtail.engine, longtail.cli; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_rebuilds_from_model_yaml_without_the_checkpoint(vit_dir, tmp_path):
    from longtail.engine import evaluate_run, fit

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=6, test_per_class=2)
    ckpt = copy_checkpoint(vit_dir[0], tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    cfg = load_config(None, ["model.name=hf_vit", f"model.pretrained={ckpt}", "data.imbalance=2", "data.batch_size=16",
                             "data.augment=none", "train.epochs=1", "optim.name=adamw", "optim.lr=1e-3",
                             "eval.batch_size=64"])
    results = fit(cfg, tmp_path / "run", data_root=str(root))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["mean"] == [0.5] * 3  # the checkpoint's normalisation, not CIFAR's
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["model"]["hf_config"]["hidden_size"] == 32 and "pretrained" not in spec["model"]
    moved = shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "run")
    shutil.rmtree(ckpt)
    again = evaluate_run(moved, data_root=str(root))
    assert again["top1"] == pytest.approx(results["top1"])


def test_full_size_vit_b16_builds_from_its_config_and_takes_a_training_step():
    from longtail.finetune import apply_finetune, parameter_counts

    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=hf_vit", "finetune.mode=lora"])
    cfg.model.hf_config = {"model_type": "vit"}  # transformers' ViTConfig defaults: ViT-B/16 at 224 pixels
    model = apply_finetune(build_model(cfg.model, num_classes=1000, image_size=224), cfg)
    trainable, total = parameter_counts(model)
    assert model.feature_dim == 768 and total > 86_000_000
    assert trainable == 768 * 1000 + 1000 + 12 * 2 * 8 * (768 + 768)  # head + rank-8 q and v parts of 12 layers
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, params))


def test_cli_train_with_download_weights_and_a_local_directory_fetches_nothing(vit_dir, tmp_path, monkeypatch):
    from longtail import cli
    from longtail.models import hf

    fetched = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: fetched.append(a))
    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    config = Path(__file__).parents[1] / "configs" / "cifar10_lt" / "ce.yaml"
    code = cli.main(["train", str(config), "model.name=hf_vit", f"model.pretrained={vit_dir[0]}",
                     "train.epochs=1", "data.imbalance=2", "data.augment=none", "eval.batch_size=64",
                     "--download-weights", "--data-root", str(root), "--out", str(tmp_path / "run")])
    assert code == 0 and not fetched and (tmp_path / "run" / "model.pt").exists()
    hf.download_weights("someone/some-clip")  # a hub id goes to the hub client, into its cache
    assert fetched == [("someone/some-clip",)]


def test_download_weights_without_a_network_names_the_url_and_the_offline_alternative(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from longtail.cli import main

    # Nothing listens on port 9: the connection is refused at once, as on a machine without a network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "clip.yaml"
    config.write_text(yaml.safe_dump({"data": {"name": "cifar10_lt"},
                                      "model": {"name": "hf_clip", "pretrained": "openai/clip-vit-base-patch32"}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--download-weights"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot fetch 'openai/clip-vit-base-patch32' from http://127.0.0.1:9/openai/clip-vit-base-patch32" in err
    assert "set model.pretrained to the local checkpoint directory" in err
    assert not (tmp_path / "run").exists()


def test_predict_on_image_files_gives_evals_probabilities_for_in_memory_data_resized_to_the_model(tmp_path):
    """CIFAR images go into a 48-pixel CLIP resized as floats on the device; predict reads the same images as
    PNG files and must prepare them with eval's own function (it resized the 8-bit image: up to 2.2e-3 apart)."""
    from PIL import Image

    from longtail.engine import collect_logits, fit, load_run
    from longtail.predict import Predictor, load_input

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=2)
    ckpt = tmp_path / "clip48"
    write_clip(ckpt, image_size=48)
    cfg = load_config(None, ["model.name=hf_clip", f"model.pretrained={ckpt}", "data.imbalance=2", "data.batch_size=16",
                             "data.augment=none", "train.epochs=1", "optim.name=adamw", "optim.lr=1e-3"])
    fit(cfg, tmp_path / "run", data_root=str(root))
    run = load_run(tmp_path / "run", str(root))
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["transform"]["resize_on"] == "float" and spec["transform"]["size"] == 48
    images = []
    for i, image in enumerate(run.data.test.images):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images[-1])
    z, _ = collect_logits(run.model, run.data.test, torch.device("cpu"))
    predictor = Predictor(tmp_path / "run", "train")  # logits calibrated to the training prior: no correction
    probabilities = predictor.probabilities(torch.stack([load_input(p, spec) for p in images]))
    torch.testing.assert_close(probabilities, z.double().softmax(1), rtol=0, atol=1e-6)
