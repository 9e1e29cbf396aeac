"""Inputs for 224-pixel models: in-memory images resized batch-wise on the device (LIFT's order of crop, flip
and resize), the resize recorded for eval and predict, and `eval.tta: lift_crops` (LIFT's five crops)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from fake_data import write_cifar10
from longtail.config import load_config
from longtail.data.augment import resized_crop_flip, to_model_size
from longtail.data.image_transforms import ImageTransform, decode_image, random_resized_crop_box, resize_shorter
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError


def _images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _manual_crops(x, size, resize):
    """LIFT's five crops written out: resize to `resize`, then top-left, top-right, bottom-left, bottom-right,
    centre windows of `size`."""
    big = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    e, c = resize - size, (resize - size) // 2
    return [big[..., :size, :size], big[..., :size, e:], big[..., e:, :size], big[..., e:, e:],
            big[..., c:c + size, c:c + size]]


def test_resized_crop_is_each_images_crop_interpolated_then_flipped():
    x = _images()
    out = resized_crop_flip(x, 56, torch.Generator().manual_seed(3))
    assert out.shape == (6, 3, 56, 56)
    g = torch.Generator().manual_seed(3)  # the same draws: the boxes first, then the flips
    boxes = [random_resized_crop_box(32, 32, g) for _ in range(6)]
    flips = torch.rand(6, generator=g) < 0.5
    assert flips.any() and not flips.all()
    for i, (top, left, h, w) in enumerate(boxes):
        want = F.interpolate(x[i:i + 1, :, top:top + h, left:left + w], size=(56, 56), mode="bilinear",
                             align_corners=False)[0]
        assert torch.allclose(out[i], want.flip(-1) if flips[i] else want, atol=1e-5), i


def test_crop_flip_happens_at_32_pixels_before_the_resize():
    x = _images()
    out = to_model_size(x, 64, "flip", True, torch.Generator().manual_seed(0))
    big = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    flipped = [torch.allclose(out[i], big[i].flip(-1), atol=1e-6) for i in range(6)]
    kept = [torch.allclose(out[i], big[i], atol=1e-6) for i in range(6)]
    assert all(a or b for a, b in zip(flipped, kept)) and any(flipped)
    assert to_model_size(x, 64, "crop_flip", True, torch.Generator()).shape == (6, 3, 64, 64)
    assert to_model_size(x, None, "resized_crop_flip", True, torch.Generator()).shape == x.shape


def test_evaluation_resizes_to_256_over_224_and_takes_the_centre():
    x = _images()
    out = to_model_size(x, 224, "resized_crop_flip", False)
    want = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[..., 16:240, 16:240]
    assert torch.equal(out, want)
    assert torch.equal(to_model_size(x, None, "crop_flip", False), x)  # no resize: as they are


def test_lift_crops_logits_are_the_mean_over_the_five_documented_crops():
    """In-memory data: 32-pixel images, a 40-pixel model, crops of 40 from a 64 resize (40 + 24)."""
    x = (_images(5) * 255).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    split = InMemorySplit(x, torch.arange(5) % 2, torch.arange(5), mean, std, "resized_crop_flip", 2)
    split.resize = 40
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 40 * 40, 4))
    from longtail.engine import collect_logits

    logits, _ = collect_logits(model, split, torch.device("cpu"), batch_size=2, tta="lift_crops")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    crops = _manual_crops(x.float() / 255, 40, 64)
    with torch.no_grad():
        want = sum(model((c - m) / s) for c in crops) / 5
    assert torch.allclose(logits, want, atol=1e-5)


def test_list_file_lift_crops_are_cut_from_the_shorter_side_resize():
    image = torch.randint(0, 256, (3, 30, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = ImageTransform(16, (0.0,) * 3, (1.0,) * 3, "none", tta="lift_crops")
    out = t(image, None)
    big = resize_shorter(image, 40).float() / 255  # 16 + 24; 40 x 60
    assert out.shape == (5, 3, 16, 16)
    want = [big[:, :16, :16], big[:, :16, 44:], big[:, 24:, :16], big[:, 24:, 44:], big[:, 12:28, 22:38]]
    for k in range(5):
        assert torch.allclose(out[k], want[k], atol=1e-6), k


def test_list_file_lift_crops_run_through_collect_logits(tmp_path):
    from test_listfile import TINY, cfg, write_tiny

    from longtail.data.listfile import build_listfile
    from longtail.engine import collect_logits

    write_tiny(tmp_path)
    data = build_listfile(cfg(), tmp_path, TINY)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    logits, _ = collect_logits(model, data.test, torch.device("cpu"), batch_size=2, tta="lift_crops")
    split = data.test
    crops = torch.stack([split.crops_transform(decode_image(split.base / p), None) for p in split.items.paths])
    assert crops.shape == (3, 5, 3, 16, 16)
    with torch.no_grad():
        want = sum(model(crops[:, k]) for k in range(5)) / 5
    assert torch.allclose(logits, want, atol=1e-5)


def test_lift_crops_are_refused_for_images_that_go_in_as_they_are(tmp_path):
    from longtail.engine import setup

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=2, test_per_class=1, noise=False)
    cfg = load_config(None, ["model.name=mlp", "model.width=8", "data.imbalance=2", "eval.tta=lift_crops"])
    with pytest.raises(ConfigError, match="eval.tta: lift_crops .* as they are"):
        setup(cfg, data_root=str(root))


@pytest.fixture(scope="module")
def clip48(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_tiny import write_clip

    path = tmp_path_factory.mktemp("clip48")
    write_clip(path, image_size=48)
    return path


def test_a_48_pixel_clip_gets_cifar_resized_and_eval_reproduces_it(clip48, tmp_path):
    from longtail.engine import evaluate_run, fit

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=2)
    cfg = load_config(None, ["model.name=hf_clip", f"model.pretrained={clip48}", "model.head=cosine",
                             "model.head_init=text", "data.augment=resized_crop_flip", "data.imbalance=2",
                             "data.batch_size=16", "train.epochs=1", "optim.lr=0.01", "eval.tta=lift_crops",
                             "eval.batch_size=64"])
    results = fit(cfg, tmp_path / "run", data_root=str(root))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["resize_to"] == 48  # resolved from the checkpoint, so eval resizes the same way
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["image_size"] == 48
    assert spec["transform"] == {"kind": "resize_center_crop", "resize": 54, "size": 48, "mean": saved["data"]["mean"],
                                 "std": saved["data"]["std"], "tta": "lift_crops", "tta_resize": 72,
                                 "resize_on": "float"}
    assert evaluate_run(tmp_path / "run", data_root=str(root))["top1"] == pytest.approx(results["top1"])
    # predict applies model.yaml's transform to image files with eval's own function: the same five crops
    from PIL import Image

    from longtail.engine import load_run
    from longtail.predict import Predictor, load_input

    test = load_run(tmp_path / "run", data_root=str(root)).data.test
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(files[-1])
    predictor = Predictor(tmp_path / "run")
    from_files = predictor.probabilities(torch.stack([load_input(f, predictor.spec) for f in files]))
    in_memory = predictor.probabilities(test.to_input(test.images[:2], "cpu", train=False, tta="lift_crops"))
    torch.testing.assert_close(from_files, in_memory, rtol=0, atol=1e-6)


def test_the_preprocessor_crop_size_is_the_input_size(clip48, tmp_path):
    import json
    import shutil

    from longtail.models.hf import input_size

    model = load_config(None, ["model.name=hf_clip", f"model.pretrained={clip48}"]).model
    assert input_size(model) == 48  # config.json's image_size
    own = shutil.copytree(clip48, tmp_path / "own")
    (own / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 40, "width": 40}}))
    model = load_config(None, ["model.name=hf_clip", f"model.pretrained={own}"]).model
    assert input_size(model) == 40


def test_resize_to_is_refused_for_image_files(tmp_path):
    from test_listfile import TINY, cfg, write_tiny

    from longtail.data import resize_inputs
    from longtail.data.listfile import build_listfile

    write_tiny(tmp_path)
    with pytest.raises(ConfigError, match="data.resize_to: resizes in-memory datasets"):
        resize_inputs(build_listfile(cfg(), tmp_path, TINY), 224)
