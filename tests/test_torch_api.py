"""longtail's pieces in a plain PyTorch loop: the splits are `Dataset`s, the training samplers `Sampler`s (the
engine's own: the same positions through `split.batches` and a `DataLoader`), every loss an `nn.Module` built
from class counts that equals its plain function, and `fit` takes a plain dict. Parametrised over the sampler
and loss registries, so an entry added there is covered without editing this file."""
import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from longtail import losses
from longtail.config import DataConfig, LossConfig, apply_overrides, load_config
from longtail.data import SAMPLERS, ClassBalancedSampler, SqrtSampler, build_data
from longtail.data.splits import InMemorySplit
from longtail.engine import fit
from longtail.errors import ConfigError
from test_loss_contract import COUNTS, LOGITS, MULTI, SINGLE  # the loss contract's cases
from tiny import TINY_MLP

NUM_IMAGES = 100


# ----------------------------------------------------------------------------- splits and samplers


def test_a_split_is_a_dataset_of_images_and_labels(data_root):
    data = build_data(DataConfig(name="fashion_mnist_lt", imbalance=5), data_root)
    assert isinstance(data.train, Dataset) and isinstance(data.test, Dataset)
    image, label = data.train[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert torch.equal(image, data.train.images[3]) and label == data.train.labels[3]
    sampler = SqrtSampler(data.train.labels, data.num_classes, seed=0)
    x, y = next(iter(DataLoader(data.train, batch_size=16, sampler=sampler)))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    assert data.train.to_input(x, "cpu", train=True, generator=torch.Generator()).shape == (16, 1, 28, 28)


def split_for(name: str) -> InMemorySplit:
    """27 images of 3 classes (20 / 5 / 2); multi-hot rows for class_aware, which samples by positive labels."""
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate([20, 5, 2])])[torch.randperm(27, generator=g)]
    if name == "class_aware":
        labels = torch.nn.functional.one_hot(labels, 3) | (torch.rand(27, 3, generator=g) < 0.2).long()
    images = torch.randint(0, 256, (27, 1, 2, 2), dtype=torch.uint8, generator=g)
    return InMemorySplit(images, labels, torch.arange(27), (0.5,), (0.5,), "none", 3)


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1)])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_engine_and_a_dataloader_draw_the_same_order(name, world, rank):
    split = split_for(name)
    engine = list(split.batches(4, sampler=name, seed=5, epoch=2, rank=rank, world=world))
    sampler = SAMPLERS[name](split.labels, split.num_classes, seed=5, rank=rank, world=world)
    assert isinstance(sampler, Sampler)
    sampler.set_epoch(2)
    mine = list(DataLoader(split, batch_size=4, sampler=sampler))
    assert len(mine) == len(engine) and len(sampler) == sum(len(y) for _, y, _ in engine)
    for (x, y, idx), (x_mine, y_mine) in zip(engine, mine):
        assert torch.equal(x, x_mine) and torch.equal(y, y_mine)
    assert list(sampler) == torch.cat([idx for _, _, idx in engine]).tolist()
    sampler.set_epoch(3)  # another epoch, another order; the same epoch again, the same one
    assert list(sampler) != torch.cat([idx for _, _, idx in engine]).tolist()
    sampler.set_epoch(2)
    assert list(sampler) == torch.cat([idx for _, _, idx in engine]).tolist()


def test_the_samplers_the_config_names_are_the_public_classes():
    assert SAMPLERS["class_balanced"] is ClassBalancedSampler and SAMPLERS["sqrt"] is SqrtSampler
    labels = split_for("class_balanced").labels
    drawn = torch.bincount(labels[list(ClassBalancedSampler(labels))], minlength=3)
    assert len(labels) == drawn.sum() and drawn.min() >= 4  # the 2-image class: about 9 draws in 27, not 2


# ----------------------------------------------------------------------------- losses

# The plain function each registered loss wraps, with the config's settings `c` and a per-class weight `w` (DRW).
PLAIN = {
    "ce": lambda z, y, c, w=None: losses.cross_entropy(z, y, weight=w),
    "cb": lambda z, y, c, w=None: losses.class_balanced_ce(z, y, COUNTS, beta=c.beta),
    "focal": lambda z, y, c, w=None: losses.focal_loss(z, y, gamma=c.gamma, weight=w),
    "ldam": lambda z, y, c, w=None: losses.ldam_loss(z, y, COUNTS, c.ldam_max_margin, c.ldam_scale, weight=w),
    "la": lambda z, y, c, w=None: losses.logit_adjusted_loss(z, y, COUNTS, tau=c.tau, weight=w),
    "bs": lambda z, y, c, w=None: losses.balanced_softmax_loss(z, y, COUNTS, weight=w),
    "bce": lambda z, y, c, w=None: losses.bce_loss(z, y, weight=w),
}
MULTILABEL_PLAIN = {
    "bce": lambda z, y, c: losses.bce_loss(z, y),
    "focal_bce": lambda z, y, c: losses.focal_bce_loss(z, y, c.focal_bce_gamma),
    "cb_bce": lambda z, y, c: losses.bce_loss(z, y, weight=losses.class_balanced_weights(COUNTS, c.cb_bce_beta)),
    "dbl": lambda z, y, c: losses.distribution_balanced_loss(z, y, COUNTS, NUM_IMAGES, c.db_alpha, c.db_beta,
                                                             c.db_mu, c.db_neg_scale, c.db_kappa),
    "db_focal": lambda z, y, c: losses.distribution_balanced_loss(
        z, y, COUNTS, NUM_IMAGES, c.db_alpha, c.db_beta, c.db_mu, c.db_neg_scale, c.db_kappa,
        focal_gamma=c.db_focal_gamma, focal_balance=c.db_focal_balance),
    "asl": lambda z, y, c: losses.asymmetric_loss(z, y, c.asl_gamma_neg, c.asl_gamma_pos, c.asl_clip),
}
REGISTERED = [(n, False) for n in losses.LOSSES] + [(n, True) for n in losses.MULTILABEL_LOSSES]


def test_every_registered_loss_has_its_plain_function_here():
    assert set(PLAIN) == set(losses.LOSSES) and set(MULTILABEL_PLAIN) == set(losses.MULTILABEL_LOSSES)


def module_and_engine(name: str, multilabel: bool, cfg: LossConfig):
    """The Module built by hand from the counts and `cfg`'s settings, and the engine's loss for `cfg`."""
    cls = (losses.MULTILABEL_LOSSES if multilabel else losses.LOSSES)[name]
    extra = {"num_images": NUM_IMAGES} if "num_images" in inspect.signature(cls).parameters else {}
    module = cls(COUNTS, **extra, **losses.hyper_parameters(cls, cfg))
    engine = losses.MultiLabelLoss(cfg, COUNTS, NUM_IMAGES) if multilabel else losses.build_loss(cfg, COUNTS, 10)
    return module, engine


@pytest.mark.parametrize("name,multilabel", REGISTERED)
def test_every_loss_module_defaults_to_the_config_and_equals_its_plain_function(name, multilabel):
    cls = (losses.MULTILABEL_LOSSES if multilabel else losses.LOSSES)[name]
    signature = inspect.signature(cls).parameters
    settings = set(signature) - {"class_counts", "drw_start", "num_images"}
    assert settings == set(cls.config_keys), "every hyper-parameter is read from a `loss` key"
    for arg, key in cls.config_keys.items():
        assert signature[arg].default == getattr(LossConfig(), key), f"{name}: {arg} defaults to loss.{key}"
    plain = (MULTILABEL_PLAIN if multilabel else PLAIN)[name]
    targets = MULTI if multilabel else SINGLE
    default = LossConfig(name=name)
    changed = LossConfig(name=name, **{key: getattr(default, key) * 0.5 + 0.1 for key in cls.config_keys.values()})
    for cfg in (default, changed):
        module, engine = module_and_engine(name, multilabel, cfg)
        assert isinstance(module, nn.Module) and isinstance(engine.module, cls)  # the engine trains this Module
        expected = plain(LOGITS, targets, cfg)
        torch.testing.assert_close(module(LOGITS, targets), expected, rtol=0, atol=0)
        torch.testing.assert_close(engine(LOGITS, targets, 0.5), expected, rtol=0, atol=0)
    drw_beta_only = cls.config_keys == losses.ClassIdLoss.config_keys and name != "cb"  # acts with drw_start
    if not drw_beta_only:  # the changed settings change the value: they reach the loss
        assert plain(LOGITS, targets, changed) != pytest.approx(plain(LOGITS, targets, default).item(), rel=1e-4)


@pytest.mark.parametrize("name", [n for n in losses.LOSSES if n != "cb"])
def test_deferred_reweighting_follows_set_epoch(name):
    cls = losses.LOSSES[name]
    loss = cls(COUNTS, drw_start=2)
    cfg = LossConfig(name=name)
    weights = losses.class_balanced_weights(COUNTS, cfg.beta)
    for epoch, weight in [(0, None), (1, None), (2, weights), (5, weights)]:
        loss.set_epoch(epoch)
        torch.testing.assert_close(loss(LOGITS, SINGLE), PLAIN[name](LOGITS, SINGLE, cfg, weight), rtol=0, atol=0)
    assert cls(COUNTS)(LOGITS, SINGLE) == PLAIN[name](LOGITS, SINGLE, cfg)  # no drw_start: never weighted


@pytest.mark.parametrize("epochs,steps", [(1, 1), (3, 7), (10, 13), (22, 3), (23, 1), (90, 101), (200, 391)])
def test_the_engine_tells_the_loss_the_epoch_of_every_step(epochs, steps):
    engine = losses.build_loss(LossConfig(name="ldam", drw_start=0.5), COUNTS, epochs)
    total = epochs * steps
    found = [engine.epoch_at((e * steps + s) / total) for e in range(epochs) for s in range(steps)]
    assert found == [e for e in range(epochs) for _ in range(steps)]


def test_a_loss_module_follows_the_logits_and_stays_out_of_state_dicts():
    loss = losses.LDAMLoss(COUNTS, drw_start=0)
    model = nn.Sequential(nn.Linear(4, 4))
    model.criterion = loss
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    assert loss(LOGITS.double(), SINGLE).dtype == torch.float64
    assert loss(LOGITS.half(), SINGLE).dtype == torch.float32


# ----------------------------------------------------------------------------- fit with a plain dict


def test_fit_refuses_a_bad_dict_as_a_config_file_is_refused(tmp_path):
    bad = {"data": {"name": "fashion_mnist_lt"}, "optim": {"lrr": 0.1}}
    (tmp_path / "bad.yaml").write_text("data:\n  name: fashion_mnist_lt\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError) as from_dict:
        fit(bad, tmp_path / "run")
    assert str(from_dict.value) == str(from_file.value) and "optim.lrr" in str(from_dict.value)
    with pytest.raises(ConfigError, match="train.epochs"):
        fit({"train": {"epochs": 0}}, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"fit: cfg must be a longtail.config.Config or a dict .* got list"):
        fit([("train", {"epochs": 1})], tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_fit_trains_a_plain_dict(tmp_path, data_root):
    raw = apply_overrides({}, [*TINY_MLP, "train.epochs=1"])  # {"data": {"name": "fashion_mnist_lt", ...}, ...}
    results = fit(raw, tmp_path / "run", data_root=str(data_root))
    assert results["checkpoint"] == "final" and 0 <= results["top1"] <= 100
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.epochs == 1 and saved.model.width == 32 and saved.data.imbalance == 5
    assert raw == apply_overrides({}, [*TINY_MLP, "train.epochs=1"])  # the caller's dict is left as it was


RANGED = [(name, cls, arg) for registry in (losses.LOSSES, losses.MULTILABEL_LOSSES) for name, cls in registry.items()
          for arg, key in cls.config_keys.items() if key in losses.modules.RANGES]


@pytest.mark.parametrize("name,cls,arg", RANGED, ids=[f"{n}-{a}" for n, _, a in RANGED])
def test_a_loss_module_refuses_an_argument_out_of_range_naming_it(name, cls, arg):
    extra = {"num_images": NUM_IMAGES} if "num_images" in inspect.signature(cls).parameters else {}
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\({arg}=-1\.0\): must be"):
        cls(COUNTS, **extra, **{arg: -1.0})


@pytest.mark.parametrize("key", sorted(losses.modules.RANGES))
def test_the_config_is_checked_by_the_modules_rules_before_any_work(key, tmp_path):
    from longtail.methods import check_config

    cfg = load_config(None, [f"loss.{key}=-1"])  # loading alone does not refuse it; the checks before a run do
    with pytest.raises(ConfigError, match=rf"^loss\.{key}: must be .*got -1"):
        check_config(cfg)
