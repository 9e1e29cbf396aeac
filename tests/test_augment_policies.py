"""data.policy / data.cutout / data.mixup_alpha / data.cutmix_alpha: the published tables, the documented
distributions (with tolerances that can fail), the ops, seeded determinism, resume bit-exactness, label
mixing in every loss and in MORE's weights, the refusals, and the shipped MiSLAS recipe."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import longtail.data.policies as policies
from crash_method import CrashAt
from fake_data import write_cifar10, write_fashion_mnist
from longtail.checkpoint import load_checkpoint
from longtail.config import LossConfig, load_config
from longtail.data.image_transforms import ImageTransform
from longtail.data.policies import (CIFAR10_POLICY, OP_NAMES, RANDAUGMENT_OPS, ImagePolicy, autoaugment_cifar,
                                    cutout, magnitudes, randaugment)
from longtail.engine import fit
from longtail.errors import ConfigError
from longtail.losses import ConfiguredLoss, MultiLabelLoss, ldam_loss
from longtail.methods.more import sample_weights
from longtail.mixing import Mixer, MixedTargets, beta, cutmix_box
from longtail.task import MULTI_LABEL
from tiny import TINY_MLP

CONFIGS = Path(__file__).parents[1] / "configs"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _chi2(counts, expected):
    counts = np.asarray(counts, dtype=float)
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------- the published tables


def test_the_cifar10_policy_is_autoaugments_25_sub_policies():
    assert len(CIFAR10_POLICY) == 25 and all(len(sub) == 2 for sub in CIFAR10_POLICY)
    assert CIFAR10_POLICY[0] == (("Invert", 0.1, None), ("Contrast", 0.2, 6))
    assert CIFAR10_POLICY[-1] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None))
    assert {op for sub in CIFAR10_POLICY for op, _, _ in sub} <= set(OP_NAMES)
    assert len(RANDAUGMENT_OPS) == 14 and "Invert" not in RANDAUGMENT_OPS


def test_magnitude_bins_are_torchvisions():
    assert magnitudes("Posterize", 10, 32, 32).tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert magnitudes("TranslateX", 10, 32, 48)[-1].item() == pytest.approx(150 / 331 * 48)
    assert magnitudes("TranslateY", 31, 32, 48)[-1].item() == pytest.approx(150 / 331 * 32)
    assert magnitudes("Rotate", 31, 32, 32)[30].item() == pytest.approx(30.0)
    assert magnitudes("Solarize", 10, 32, 32)[0].item() == 1.0 and magnitudes("Solarize", 10, 32, 32)[-1].item() == 0
    assert magnitudes("Color", 10, 32, 32)[9].item() == pytest.approx(0.9)


# ----------------------------------------------------------------------------- the ops


def test_geometric_ops():
    img = torch.zeros(1, 1, 5, 5)
    img[0, 0, 0, 0] = 1
    rotated = policies.rotate(img, torch.tensor([90.0]))
    assert rotated[0, 0, 4, 0] == 1 and rotated.sum() == 1  # counter-clockwise: top-left goes to bottom-left
    shifted = policies.translate_x(img, torch.tensor([2.7]))  # whole pixels, truncated
    assert shifted[0, 0, 0, 2] == 1 and shifted.sum() == 1
    x = torch.rand(2, 3, 6, 6)
    assert torch.equal(policies.shear_x(x, torch.zeros(2)), x)
    # about the top-left corner: row r of column c comes from row floor(r + 0.5 + c + 0.5) = r + c + 1
    sheared = policies.shear_y(x, torch.tensor([1.0, 1.0]))
    assert torch.equal(sheared[:, :, 0, 2], x[:, :, 3, 2]) and (sheared[:, :, 4, 1] == 0).all()


@pytest.mark.parametrize("op,pillow_matrix", [("shear_x", lambda m: (1, m, 0, 0, 1, 0)),
                                              ("shear_y", lambda m: (1, 0, 0, m, 1, 0)),
                                              ("translate_x", lambda m: (1, 0, -int(m), 0, 1, 0)),
                                              ("translate_y", lambda m: (1, 0, 0, 0, 1, -int(m)))])
def test_affine_ops_match_pillow_pixel_for_pixel(op, pillow_matrix):
    """AutoAugment's original ops are Pillow's img.transform(size, AFFINE, matrix) with NEAREST, fill 0."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    magnitudes = torch.tensor([0.3, -0.3, 0.1, -0.17, 5.0, -9.0])
    if op.startswith("shear"):
        magnitudes = magnitudes.clamp(-0.3, 0.3)
    ours = getattr(policies, op)(images.float() / 255, magnitudes).mul(255).round().to(torch.uint8)
    for image, m, mine in zip(images, magnitudes.tolist(), ours):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).transform((32, 32), Image.AFFINE, pillow_matrix(m),
                                                                         Image.NEAREST)
        assert torch.equal(mine, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)), (op, m)


def test_colour_ops():
    x = torch.tensor([0.0, 10, 100, 255]).div(255).view(1, 1, 2, 2)
    assert (policies.posterize(x, torch.tensor([4.0])) * 255).round().flatten().tolist() == [0, 0, 96, 240]
    solarized = torch.tensor([0.0, 10, 155, 0]).div(255).view(1, 1, 2, 2)
    assert torch.allclose(policies.solarize(x, torch.tensor([100 / 255])), solarized)
    assert torch.equal(policies.invert(x, None), 1 - x)
    stretched = policies.autocontrast(x * 0.5 + 0.1, None)
    assert stretched.min() == 0 and stretched.max() == pytest.approx(1)
    assert torch.allclose(policies.brightness(x, torch.tensor([-0.5])), x * 0.5)
    assert torch.equal(policies.contrast(x, torch.tensor([0.0])), x)  # factor 1: the image itself
    assert torch.equal(policies.color(x, torch.tensor([-1.0])), x)  # one channel: its greyscale is itself
    sharp = policies.sharpness(torch.rand(1, 3, 6, 6), torch.tensor([0.5]))
    assert sharp.shape == (1, 3, 6, 6)


def _equalize_reference(channel: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize as torchvision's _scale_channel writes it, on one uint8 channel."""
    hist = torch.bincount(channel.flatten(), minlength=256)
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
        return channel
    lut = (torch.cumsum(hist, 0) + step // 2) // step
    lut = torch.cat([torch.zeros(1, dtype=lut.dtype), lut[:-1]]).clamp(0, 255)
    return lut[channel]


def test_equalize_matches_the_reference_per_channel():
    u = torch.randint(0, 120, (3, 2, 16, 16), generator=_gen(3))
    u[2, 1] = 7  # a constant channel stays as it is
    out = (policies.equalize(u.float() / 255, None) * 255).round().long()
    for i in range(3):
        for c in range(2):
            assert torch.equal(out[i, c], _equalize_reference(u[i, c])), (i, c)


# ----------------------------------------------------------------------------- the documented distributions


def _recording(monkeypatch):
    calls = []
    real = policies.apply_ops

    def record(x, ops, mags, on):
        calls.append((ops.clone(), mags.clone(), on.clone()))
        return real(x, ops, mags, on)

    monkeypatch.setattr(policies, "apply_ops", record)
    return calls


def test_autoaugment_draws_sub_policies_uniformly_and_applies_ops_with_their_probability(monkeypatch):
    calls = _recording(monkeypatch)
    n = 20000
    autoaugment_cifar(torch.rand(n, 3, 4, 4), _gen(0))
    (ops0, mags0, on0), (ops1, _, on1) = calls
    pairs = torch.stack([ops0, ops1], 1)
    table = torch.tensor([[OP_NAMES.index(op) for op, _, _ in sub] for sub in CIFAR10_POLICY])
    # every drawn pair is a sub-policy, and each distinct pair turns up as often as it is listed (uniformly)
    listed = {}
    for row in table.tolist():
        listed[tuple(row)] = listed.get(tuple(row), 0) + 1
    seen = {}
    for row in pairs.tolist():
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    assert set(seen) == set(listed)
    keys = sorted(listed)
    assert _chi2([seen[k] for k in keys], np.array([listed[k] for k in keys]) * n / 25) < 60  # 23 dof, p ~ 1e-4
    probs = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY])
    for stage, on in ((0, on0), (1, on1)):
        assert on.float().mean().item() == pytest.approx(probs[:, stage].mean().item(), abs=0.015)
    invert_contrast = (ops0 == OP_NAMES.index("Invert")) & (ops1 == OP_NAMES.index("Contrast"))
    assert on0[invert_contrast].float().mean().item() == pytest.approx(0.1, abs=0.04)
    rotate = ops0 == OP_NAMES.index("Rotate")  # sub-policy 2: bin 2 of 0..30 degrees, either sign
    assert rotate.any() and torch.allclose(mags0[rotate].abs(), torch.tensor(30 / 9 * 2))
    assert (mags0[rotate] > 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_randaugment_draws_ops_uniformly_at_the_fixed_magnitude(monkeypatch):
    calls = _recording(monkeypatch)
    n = 14000
    randaugment(torch.rand(n, 3, 4, 4), _gen(1), num_ops=2, magnitude=9)
    assert len(calls) == 2
    for ops, mags, on in calls:
        assert on.all()
        counts = [(ops == OP_NAMES.index(name)).sum().item() for name in RANDAUGMENT_OPS]
        assert _chi2(counts, n / 14) < 40  # 13 dof, p ~ 1e-4
        shear = ops == OP_NAMES.index("ShearX")
        assert shear.any() and torch.allclose(mags[shear].abs(), torch.tensor(0.3 * 9 / 30))


def test_cutout_centres_are_uniform_and_squares_are_clipped_at_borders():
    n, size = 16000, 1
    holes = cutout(torch.ones(n, 1, 8, 8), _gen(2), size) == 0
    assert holes.flatten(1).sum(1).eq(1).all()
    assert _chi2(holes.sum(0).flatten().tolist(), n / 64) < 110  # 63 dof, p ~ 2e-4
    squares = cutout(torch.ones(4000, 3, 32, 32), _gen(3), 16) == 0
    assert torch.equal(squares[:, 0], squares[:, 2])  # the same square in every channel
    area = squares[:, 0].flatten(1).sum(1)
    rows, cols = squares[:, 0].any(2).sum(1), squares[:, 0].any(1).sum(1)
    assert torch.equal(area, rows * cols) and area.max() == 256 and area.min() >= 64  # clipped: at least 8 x 8
    # unclipped only when the centre's row and column are both in 8..24 (17 of 32 values each)
    assert (area < 256).float().mean().item() == pytest.approx(1 - (17 / 32) ** 2, abs=0.02)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_lambda_follows_beta_alpha_alpha(alpha):
    g = _gen(4)
    lam = np.array([beta(alpha, g) for _ in range(6000)])
    assert lam.mean() == pytest.approx(0.5, abs=0.015)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.008)


def test_mixup_mixes_images_and_targets_with_one_lambda_and_a_permutation():
    x, y = torch.rand(8, 3, 6, 6), torch.arange(8)
    mixed, t = Mixer(mixup_alpha=1.0)(x, y, _gen(5))
    lam = float(t.lam)
    perm = t.b  # labels are positions here, so b is the permutation
    assert sorted(perm.tolist()) == list(range(8)) and torch.equal(t.a, y)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


def test_cutmix_pastes_one_box_and_corrects_lambda_to_its_area():
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    for seed in range(10):
        mixed, t = Mixer(cutmix_alpha=1.0)(x, y, _gen(seed))
        g = _gen(seed)  # replay the documented draws: lam, the permutation, the box
        lam = beta(1.0, g)
        perm = torch.randperm(8, generator=g)
        top, bottom, left, right = cutmix_box(16, 16, lam, g)
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[top:bottom, left:right] = True
        assert torch.equal(t.b, perm)
        assert torch.equal(mixed, torch.where(box, x[perm], x))
        assert float(t.lam) == pytest.approx(1 - box.sum().item() / 256)


def test_cutmix_box_has_sides_sqrt_one_minus_lambda_and_a_uniform_centre():
    g = _gen(0)
    sides = [(bottom - top, right - left) for top, bottom, left, right in
             (cutmix_box(100, 100, 0.75, g) for _ in range(3000))]
    assert all(h <= 50 and w <= 50 for h, w in sides)  # sqrt(1 - 0.75) of each side
    # unclipped only when the centre's row and column are both in 25..75 (51 of 100 values each)
    assert np.mean([s == (50, 50) for s in sides]) == pytest.approx(0.51 ** 2, abs=0.03)


def test_with_both_alphas_each_batch_picks_one_with_probability_half():
    x, y, g = torch.rand(4, 1, 8, 8), torch.arange(4), _gen(6)
    mixer, kinds = Mixer(mixup_alpha=0.5, cutmix_alpha=1.0), []
    for _ in range(800):
        replay = torch.Generator()
        replay.set_state(g.get_state())
        mixed, t = mixer(x, y, g)
        cut = bool(torch.rand((), generator=replay) < 0.5)  # the documented draws, in order
        lam = beta(1.0 if cut else 0.5, replay)
        perm = torch.randperm(4, generator=replay)
        if cut:
            top, bottom, left, right = cutmix_box(8, 8, lam, replay)
            expected = x.clone()
            expected[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / 64
        else:
            expected = lam * x + (1 - lam) * x[perm]
        assert torch.allclose(mixed, expected) and float(t.lam) == pytest.approx(lam) and torch.equal(t.b, perm)
        kinds.append(cut)
    assert np.mean(kinds) == pytest.approx(0.5, abs=0.05)


def test_every_draw_is_seeded():
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16)
    for policy in (ImagePolicy("autoaugment_cifar", cutout=16), ImagePolicy("randaugment", 3, 15, 8)):
        assert torch.equal(policy(x, _gen(7)), policy(x, _gen(7)))
        assert not torch.equal(policy(x, _gen(7)), policy(x, _gen(8)))
    mixer = Mixer(mixup_alpha=0.5, cutmix_alpha=1.0)
    (a, ta), (b, tb) = mixer(x, y, _gen(9)), mixer(x, y, _gen(9))
    assert torch.equal(a, b) and torch.equal(ta.b, tb.b) and float(ta.lam) == float(tb.lam)


def test_list_file_workers_apply_the_same_policy_seeded_per_sample():
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=_gen(10))
    plain = ImageTransform(32, augment="none")
    with_policy = ImageTransform(32, augment="none", policy=ImagePolicy("randaugment", 2, 20, 12))
    assert not plain.random and with_policy.random
    a, b = with_policy(image, _gen(11)), with_policy(image, _gen(11))
    assert torch.equal(a, b) and not torch.equal(a, plain(image, None))
    assert ((a == a.amin(dim=(1, 2), keepdim=True)).all(0)).sum() >= 12 * 12 // 4  # a cut-out hole (value 0 -> min)


# ----------------------------------------------------------------------------- mixing in the losses and in MORE


def _mixed(n=12, c=5, seed=12):
    g = _gen(seed)
    logits = torch.randn(n, c, generator=g)
    a, b = torch.randint(c, (n,), generator=g), torch.randint(c, (n,), generator=g)
    return logits, MixedTargets(a, b, torch.tensor(0.3))


@pytest.mark.parametrize("name", ["ce", "cb", "focal", "ldam", "la", "bs", "bce"])
def test_a_mixed_batch_loss_is_lam_times_each_targets_loss(name):
    logits, t = _mixed()
    counts = [50, 20, 10, 5, 2]
    loss = ConfiguredLoss(LossConfig(name=name), counts, epochs=10)
    expected = 0.3 * loss(logits, t.a, 0.5) + 0.7 * loss(logits, t.b, 0.5)
    assert torch.allclose(loss(logits, t, 0.5), expected)


def test_mixed_ce_and_ldam_by_hand():
    logits, t = _mixed()
    ce = ConfiguredLoss(LossConfig(name="ce"), [5] * 5, epochs=1)
    by_hand = -(0.3 * F.log_softmax(logits, 1)[range(12), t.a] + 0.7 * F.log_softmax(logits, 1)[range(12), t.b]).mean()
    assert torch.allclose(ce(logits, t, 0.0), by_hand)
    counts = [50, 20, 10, 5, 2]
    ldam = ConfiguredLoss(LossConfig(name="ldam", drw_start=0.5), counts, epochs=10)
    w = ldam.class_weights  # DRW: the class-balanced weights of each target, from half-way
    expected = 0.3 * ldam_loss(logits, t.a, counts, weight=w) + 0.7 * ldam_loss(logits, t.b, counts, weight=w)
    assert torch.allclose(ldam(logits, t, 0.6), expected)


def test_mixed_multi_hot_bce_is_bce_on_the_mixed_targets():
    g = _gen(13)
    logits = torch.randn(6, 4, generator=g)
    a, b = (torch.rand(6, 4, generator=g) < 0.4).float(), (torch.rand(6, 4, generator=g) < 0.4).float()
    loss = MultiLabelLoss(LossConfig(name="bce"), [3, 3, 3, 3], num_images=10)
    soft = F.binary_cross_entropy_with_logits(logits, 0.3 * a + 0.7 * b)
    assert torch.allclose(loss(logits, MixedTargets(a, b, torch.tensor(0.3)), 0.0), soft)


def test_more_weights_a_mixed_sample_by_lam_pi_a_plus_one_minus_lam_pi_b():
    prior = torch.tensor([0.5, 0.3, 0.15, 0.05])
    t = MixedTargets(torch.tensor([0, 1, 3]), torch.tensor([3, 1, 2]), torch.tensor(0.25))
    assert torch.allclose(sample_weights(t, prior), 0.25 * prior[t.a] + 0.75 * prior[t.b])
    multi = MixedTargets(torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[0.0, 0, 0, 1]]), torch.tensor(0.5))
    assert torch.allclose(sample_weights(multi, prior, MULTI_LABEL), torch.tensor([0.5 * 0.4 + 0.5 * 0.05]))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides, words", [
    (["method.name=crt", "data.mixup_alpha=1.0"], ["data.mixup_alpha", "crt", "classifier"]),
    (["method.name=lws", "data.policy=randaugment"], ["data.policy", "lws", "cache_features"]),
    (["method.name=wb_stage2", "data.cutmix_alpha=1.0"], ["data.cutmix_alpha", "wb_stage2"]),
    (["finetune.mode=linear", "data.policy=autoaugment_cifar"], ["data.policy", "finetune.mode=linear", "head"]),
    (["data.randaugment_m=31"], ["data.randaugment_m", "0..30"]),
    (["data.randaugment_n=0"], ["data.randaugment_n"]),
    (["data.cutout=-1"], ["data.cutout", ">= 0"]),
    (["data.mixup_alpha=-0.1"], ["data.mixup_alpha"]),
    (["data.policy=autoaugment"], ["data.policy", "autoaugment_cifar", "randaugment"]),
])
def test_refused_settings_name_the_key_and_why(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_cutout_is_allowed_for_head_only_stages_like_crop_flip():
    load_config(None, ["method.name=crt", "data.cutout=8"])


# ----------------------------------------------------------------------------- the engine: exact under resume


TINY = [*TINY_MLP, "data.augment=crop_flip", "train.epochs=2", "train.log_every=2", "schedule.name=cosine",
        "data.policy=randaugment", "data.cutout=8", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, train_per_class=30, test_per_class=6)
    return str(root)


def _weights(run):
    return torch.load(run / "model.pt", weights_only=True)


def test_augmented_runs_are_seeded_and_resume_bit_for_bit(tmp_path, data_root):
    cfg = load_config(None, [*TINY, "train.checkpoint_every=3"])
    cfg.method.name = "crash_test"
    CrashAt.calls, CrashAt.crash_at = 0, 0
    fit(cfg, tmp_path / "reference", data_root=data_root)
    CrashAt.calls, CrashAt.crash_at = 0, 14  # in epoch 2 (about 8 steps an epoch), after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "resumed", data_root=data_root)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["partial"]["epoch"] == 1
    CrashAt.crash_at = 0
    fit(cfg, tmp_path / "resumed", resume=True, data_root=data_root)
    ref, res = _weights(tmp_path / "reference"), _weights(tmp_path / "resumed")
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    other = load_config(None, [*TINY, "train.seed=1"])
    fit(other, tmp_path / "other", data_root=data_root)
    assert not all(torch.equal(ref[k], v) for k, v in _weights(tmp_path / "other").items())


def test_multi_label_mosaics_train_with_mixing_policies_and_more(tmp_path):
    write_cifar10(tmp_path / "data", train_per_class=12, test_per_class=2)
    cfg = load_config(None, ["data.name=cifar10_mosaic_mlt", "data.mosaic_train_images=64",
                             "data.mosaic_test_images=16", "loss.name=dbl", "data.sampler=class_aware", "model.name=mlp", "model.width=16",
                             "train.epochs=1", "data.batch_size=16", "eval.batch_size=64", "more.enabled=true",
                             "data.policy=autoaugment_cifar", "data.cutout=8", "data.mixup_alpha=1.0",
                             "data.cutmix_alpha=1.0"])
    results = fit(cfg, tmp_path / "run", data_root=str(tmp_path / "data"))
    assert results["task"] == "multi_label" and np.isfinite(results["map"])


# ----------------------------------------------------------------------------- the shipped recipe


@pytest.mark.parametrize("name", ["cifar10_lt/mislas_stage1_mixup.yaml", "cifar100_lt/mislas_stage1_mixup.yaml"])
def test_the_mislas_stage1_recipe_mixes_and_trains_a_step(tmp_path, name, capsys):
    cfg = load_config(CONFIGS / name)
    assert cfg.data.mixup_alpha == 1.0 and cfg.data.cutmix_alpha == 0 and cfg.method.name == "erm"
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.weight_decay, cfg.train.epochs) == (0.1, 128, 2e-4, 200)
    assert cfg.schedule.milestones == [0.8, 0.9] and cfg.schedule.gamma == 0.1
    if name.startswith("cifar10_"):
        write_cifar10(tmp_path / "data", train_per_class=12, test_per_class=2)
        tiny = load_config(CONFIGS / name, ["model.name=mlp", "model.width=16", "train.epochs=1",
                                            "data.batch_size=32", "data.imbalance=3", "eval.batch_size=64"])
        results = fit(tiny, tmp_path / "run", data_root=str(tmp_path / "data"))
        assert results["config"]["data"]["mixup_alpha"] == 1.0
        assert "augmentation crop_flip + mixup 1," in capsys.readouterr().out  # the run's first line says so


def test_rotate_matches_pillow_pixel_for_pixel():
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    degrees = torch.tensor([10.0, -23.3, 30.0, 90.0, -7.1])
    ours = policies.rotate(images.float() / 255, degrees).mul(255).round().to(torch.uint8)
    for image, d, mine in zip(images, degrees.tolist(), ours):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).rotate(d, resample=Image.NEAREST)
        assert torch.equal(mine, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)), d
