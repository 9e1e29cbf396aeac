"""Weight balancing, stage 2 (WB, Alshammari et al. CVPR 2022): re-balance the classifier of a stage-1 model.

Stage 1 is ERM with cross-entropy and weight decay (a config, no code). Stage 2 starts from the stage-1
run named by `method.init_from`, freezes the backbone, and trains only the classifier with a
class-balanced loss and strong weight decay while MaxNorm keeps every class vector inside a ball
(projected gradient descent: rows longer than the radius are scaled back after each step).

`ClassifierRetraining` is what every two-stage method shares (cRT and LWS in decoupled.py build on
it): loading stage 1, freezing the backbone, BN statistics frozen or not, and optional feature caching.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtail.checkpoint import load_checkpoint
from longtail.config import Config, read_yaml
from longtail.errors import ConfigError
from longtail.inference import collect_features
from longtail.losses import class_balanced_weights
from longtail.methods.base import LossFn, Method, RunInfo
from longtail.models import state_dict_mismatch

# The data keys that decide which images form the training split.
SUBSET_KEYS = ("name", "imbalance", "profile", "minority_fraction", "selection", "val_per_class", "subset_seed",
               "train_list")


def load_stage1(model: nn.Module, cfg: Config) -> None:
    """Load the stage-1 weights named by `method.init_from` (a run directory or a model.pt) into `model`."""
    if cfg.method.init_from is None:
        raise ConfigError(
            f"method.init_from: {cfg.method.name} starts from a trained stage-1 model; set method.init_from to "
            "its run directory (e.g. runs/cifar10_lt/wb_stage1) or to a model.pt"
        )
    load_init(model, cfg)


def load_init(model: nn.Module, cfg: Config) -> None:
    """`method.init_from` (a run directory or a model.pt) into `model`: the same architecture, and where the run's
    config.yaml is beside it, the same training subset."""
    path = Path(cfg.method.init_from)
    model_pt = path / "model.pt" if path.is_dir() else path
    if not model_pt.is_file():
        raise ConfigError(f"method.init_from: {model_pt} does not exist; give a finished run's directory or its "
                          "model.pt")
    check_same_subset(model_pt.parent / "config.yaml", cfg)
    try:
        state = load_checkpoint(model_pt, kind="model file")
    except ConfigError as exc:
        raise ConfigError(f"method.init_from: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"method.init_from: {model_pt} does not fit this config's model ({cfg.model.name}, head "
            f"{cfg.model.head}): {state_dict_mismatch(exc)}; the model.* settings must match those of the run it "
            "comes from"
        ) from None


def check_same_subset(stage1_config: Path, cfg: Config) -> None:
    """A run started from another must train on its images: another subset could put that run's training images
    in this one's val or test split."""
    if not stage1_config.is_file():
        return  # a bare model.pt: nothing to compare against
    stage1 = read_yaml(stage1_config).get("data", {})
    mine = dataclasses.asdict(cfg.data)
    differ = [k for k in SUBSET_KEYS if k in stage1 and stage1[k] != mine[k]]
    if differ:
        shown = ", ".join(f"data.{k}: {stage1[k]!r} there, {mine[k]!r} here" for k in differ)
        raise ConfigError(
            f"method.init_from: the run it starts from ({stage1_config.parent}) trained on a different subset "
            f"({shown}); use that run's data settings"
        )


class CachedFeatures:
    """A training split whose inputs are precomputed backbone features: same batches, same order."""

    def __init__(self, split: Any, features: torch.Tensor):
        # Rows are looked up by position in the split: a skipped image would shift every later one.
        if len(features) != len(split):
            raise ConfigError(f"method.cache_features: features for {len(features)} of the {len(split)} training "
                              "images (unreadable ones skipped under data.on_bad_sample=skip, named above); remove "
                              "those images from the split or set method.cache_features=false")
        self.split = split
        self.features = features
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.split)

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        return self.split.num_batches(batch_size, world=world, drop_last=drop_last)

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _, y, idx in self.split.batches(batch_size, **kwargs):
            yield self.features[idx], y, idx

    def to_input(self, x: torch.Tensor, device: torch.device | str, train: bool,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x.to(device, non_blocking=True)


class ClassifierRetraining(Method):
    """Stage 2 of a decoupled recipe: load stage 1, freeze everything but the head, train the head."""

    def __init__(self, cfg: Config, info: RunInfo, base_loss: LossFn):
        super().__init__(cfg, info, base_loss)
        self.cached = False

    def prepare(self, model: nn.Module) -> nn.Module:
        load_stage1(model, self.cfg)
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.cfg.method.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def train_split(self, split: Any, model: nn.Module) -> Any:
        """With `method.cache_features`, the backbone runs once over the training images, not every epoch."""
        method = self.cfg.method
        if not method.cache_features:
            return split
        if self.cfg.data.augment != "none":
            raise ConfigError(
                f"method.cache_features: needs data.augment=none (augmented images give new features every "
                f"epoch), but data.augment is {self.cfg.data.augment!r}; set data.augment=none or "
                "method.cache_features=false"
            )
        if self.cfg.data.cutout:
            raise ConfigError(
                f"method.cache_features: needs data.cutout=0 (cut-out images give new features every epoch), but "
                f"data.cutout is {self.cfg.data.cutout}; set data.cutout=0 or method.cache_features=false"
            )
        if not method.freeze_bn:
            raise ConfigError(
                "method.cache_features: needs method.freeze_bn=true (BN layers in training mode make a sample's "
                "features depend on its batch); set method.freeze_bn=true or method.cache_features=false"
            )
        features, _ = collect_features(model, split, self.info.device, self.cfg.eval.batch_size,
                                       "cache train features")
        self.cached = True
        return CachedFeatures(split, features)

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached:
            return x, model.head(x)
        return super().forward(model, x)


def maxnorm_radius(weight: torch.Tensor, thresh: float) -> float:
    """delta = min_k ||w_k|| + thresh * (max_k ||w_k|| - min_k ||w_k||) over the rows of `weight`."""
    norms = weight.detach().double().norm(dim=1)
    return float(norms.min() + thresh * (norms.max() - norms.min()))


@torch.no_grad()
def project_rows(weight: torch.Tensor, radius: float) -> None:
    """Rescale, in place, every row of `weight` longer than `radius` to length `radius`."""
    norms = weight.norm(dim=1, keepdim=True)
    weight.mul_((radius / norms.clamp(min=1e-12)).clamp(max=1.0))


def softmax_bce_loss(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The WB reference code's class-balanced loss: binary cross-entropy between the softmax
    probabilities and one-hot targets, every element of sample i weighted by w_{y_i}, mean over N x K."""
    # binary_cross_entropy refuses autocast; the probabilities need float32 anyway
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.float().softmax(dim=1)
        onehot = F.one_hot(targets, logits.shape[1]).float()
        weight = class_weights.to(probs)[targets][:, None].expand_as(probs)
        return F.binary_cross_entropy(probs, onehot, weight=weight)


class WBStage2(ClassifierRetraining):
    """WB stage 2: class-balanced loss (the `loss` section, usually cb) + weight decay + MaxNorm."""

    def __init__(self, cfg: Config, info: RunInfo, base_loss: LossFn):
        super().__init__(cfg, info, base_loss)
        if cfg.method.cb_variant == "softmax_bce" and cfg.loss.name != "cb":
            raise ConfigError(
                f"method.cb_variant: softmax_bce is a form of the class-balanced loss, but loss.name is "
                f"{cfg.loss.name!r}; set loss.name: cb or method.cb_variant: ce"
            )
        self.class_weights = class_balanced_weights(info.class_counts, cfg.loss.beta)
        self.radius: Optional[float] = None

    def prepare(self, model: nn.Module) -> nn.Module:
        if not isinstance(model.head, nn.Linear):
            raise ConfigError(
                f"method.name: wb_stage2 trains a linear classifier (MaxNorm bounds its rows), but the head is a "
                f"{type(model.head).__name__}; set model.head: linear (a stage-1 etf head loads into it)"
            )
        model = super().prepare(model)
        # From the stage-1 classifier, once: the ball every class vector must stay in.
        self.radius = maxnorm_radius(model.head.weight, self.cfg.method.maxnorm_thresh)
        return model

    def criterion(
        self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict]:
        if self.cfg.method.cb_variant == "softmax_bce":
            return softmax_bce_loss(logits, y, self.class_weights), {}
        return self.base_loss(logits, y, progress), {}

    def after_step(self, model: nn.Module) -> None:
        if self.cfg.method.maxnorm_every == "step":
            project_rows(model.head.weight, self.radius)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.cfg.method.maxnorm_every == "epoch":
            project_rows(model.head.weight, self.radius)
