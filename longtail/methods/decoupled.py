"""Classic decoupled classifiers (Kang et al. 2020) on a frozen stage-1 backbone, beside WB stage 2.

- cRT: the head is re-initialised and re-trained (its configs use the class-balanced sampler).
- LWS: the stage-1 head stays fixed; one learnable scale per class multiplies its logits. The scales
  fold into the head after training, so the exported model is a plain linear head.
- tau-normalisation: no training; w_k / ||w_k|| ** tau with the bias kept (as WB's reference code
  does), tau given (`method.tau_norm_tau`) or searched on the validation split over `posthoc.grid`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.inference import collect_features
from longtail.methods.base import Method
from longtail.methods.posthoc import balanced_accuracy, linear_head, linear_parts, tau_grid
from longtail.methods.weight_balancing import ClassifierRetraining, load_stage1
from longtail.models.heads import build_head
from longtail.progress import track


class CRT(ClassifierRetraining):
    """Classifier re-training: a freshly initialised head (seeded by `train.seed`) on frozen features."""

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            model.head = build_head(self.cfg.model, model.feature_dim, self.info.num_classes)
        return model


class ScaledHead(nn.Module):
    """A fixed head whose logits are multiplied by one learnable scale per class (initialised to 1)."""

    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.scale


class LWS(ClassifierRetraining):
    """Learnable weight scaling: only the per-class scales train."""

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        linear_parts(model.head, "method.name: lws")  # the scales must fold into the head afterwards
        model.head = ScaledHead(model.head, self.info.num_classes)
        return model

    @classmethod
    def folds(cls, cfg: Config, method_record: dict) -> list[dict]:
        return [{"kind": "lws_scales"}]

    def finalize(self, model: nn.Module) -> nn.Module:
        weight, bias = linear_parts(model.head.head, "method.name: lws")
        scale = model.head.scale.detach()
        model.head = linear_head(weight * scale[:, None], None if bias is None else bias * scale, weight)
        return model


def tau_normalized(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_k / ||w_k|| ** tau for every row."""
    return weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12).pow(tau)


class TauNorm(Method):
    """tau-normalisation of the stage-1 classifier; nothing trains (`param_groups` is empty)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        load_stage1(model, self.cfg)
        if not isinstance(model.head, nn.Linear):
            raise ConfigError(
                f"method.name: tau_norm rescales the rows of a linear classifier, but the head is a "
                f"{type(model.head).__name__}; set model.head: linear"
            )
        return model.requires_grad_(False)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        model.eval()

    @classmethod
    def folds(cls, cfg: Config, method_record: dict) -> list[dict]:
        return [{"kind": "tau_norm", "tau": method_record["tau_norm"]["tau"]}]

    def finalize(self, model: nn.Module) -> nn.Module:
        weight, bias = linear_parts(model.head, "method.name: tau_norm")
        tau = self.cfg.method.tau_norm_tau
        record: dict = {"tau": tau, "searched": tau is None}
        if tau is None:
            tau, record["curve"] = self.search(model, weight, bias)
            record["tau"] = tau
        self.info.extra["tau_norm"] = record
        model.head = linear_head(tau_normalized(weight, tau), bias, weight)
        return model

    def search(self, model: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, list]:
        """The tau of `posthoc.grid` with the best validation balanced accuracy (features computed once)."""
        val = self.info.data.val
        if val is None:
            raise ConfigError(
                "method.tau_norm_tau: null means searching tau on the validation split, but this run has none; "
                "set data.val_per_class or give method.tau_norm_tau (Kang et al. use 1)"
            )
        features, targets = collect_features(model, val, self.info.device, self.cfg.eval.batch_size,
                                             "tau-norm: val features")
        w = weight.double().cpu()
        b = None if bias is None else bias.double().cpu()
        curve = [[tau, round(balanced_accuracy(F.linear(features.double(), tau_normalized(w, tau), b), targets), 9)]
                 for tau in track(tau_grid(self.cfg.posthoc.grid), "tau-norm: search tau", "tau")]
        return max(curve, key=lambda point: point[1])[0], curve
