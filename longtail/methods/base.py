"""The seam every training recipe plugs into.

The engine knows only this interface. A method decides which parameters train, how a batch becomes
a loss, what happens after each optimiser step and epoch, and what the trained model becomes before
export. `forward` and `criterion` are separate so that a wrapper (MORE) can run extra forward
passes and add to the loss without copying the method it wraps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from longtail.config import Config
from longtail.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (logits, targets, progress) -> loss


@dataclass
class RunInfo:
    """What a method may know about the run it is part of."""

    cfg: Config
    num_classes: int
    class_counts: list[int]  # training images per class id
    epochs: int
    steps_per_epoch: int
    device: torch.device
    data: Any = None  # the LTData bundle (two-stage methods read the training split through it)
    run_dir: Optional[str] = None
    extra: dict = field(default_factory=dict)
    task: str = "single_label"  # longtail.task: the dataset's task kind

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def prior(self) -> torch.Tensor:
        counts = torch.tensor(self.class_counts, dtype=torch.float32)
        return counts / counts.sum()


class Method:
    """Plain empirical risk minimisation: every parameter trains on the base loss."""

    def __init__(self, cfg: Config, info: RunInfo, base_loss: LossFn):
        self.cfg = cfg
        self.info = info
        self.base_loss = base_loss

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse a config this method cannot run, with a `ConfigError` naming the key, before any work starts
        (`longtail.methods.check_config`: `longtail.config` cannot import the methods). Nothing by default."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap, freeze or replace parts of the model before the optimiser is built."""
        return model

    def train_split(self, split: Any, model: nn.Module) -> Any:
        """The split the training loop iterates (stage-2 methods may swap in cached features)."""
        return split

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Trainable parameters with their weight decay (optionally none on BN and biases)."""
        optim = self.cfg.optim
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not optim.wd_exclude_bn_bias:
            return [{"params": [p for _, p in params], "weight_decay": optim.weight_decay}]
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]  # biases and norm scales/shifts
        return [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and logits of a training batch."""
        features = model.features(x)
        return features, model.head(features)

    def criterion(
        self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict]:
        return self.base_loss(logits, y, progress), {}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict]:
        """One batch -> (loss, scalars to log). `progress` is the fraction of training done, in [0, 1)."""
        features, logits = self.forward(model, x)
        return self.criterion(features, logits, y, progress)

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (two-stage methods keep frozen BN layers in eval mode)."""
        model.train()

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. MaxNorm projection)."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after every epoch."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Turn the trained model into the one that is exported (merge, fold)."""
        return model

    @classmethod
    def folds(cls, cfg: Config, method_record: dict) -> list[dict]:
        """What `finalize` folds into the weights, as model.yaml's `folds` records it. A class method:
        `longtail posthoc` rebuilds the list from a finished run's config and method record."""
        return []

    def diagnostics(self, model: nn.Module, split: Any, device: torch.device) -> dict:
        """Records logged every `train.track_every` epochs besides the FDR tracking (MORE: where its
        low-rank part acts); none by default."""
        return {}


class ZeroShot(Method):
    """CLIP zero-shot: the text-initialised head (model.head_init: text) evaluated as it is, nothing trained."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.clip_feature != "projected":
            raise ConfigError(f"model.clip_feature: {cfg.model.clip_feature} gives logits other than CLIP's zero-shot "
                              "ones, which method.name zero_shot evaluates; use model.clip_feature projected")
        if cfg.model.head_init != "text" or cfg.more.enabled:
            raise ConfigError("method.name: zero_shot evaluates the text-initialised head untrained; it needs "
                              "model.head_init text and more.enabled false")

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []
