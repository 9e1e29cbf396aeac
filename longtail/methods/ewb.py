"""The EWB one-stage recipe (EWB, Hasegawa & Sato ICLR 2024), the simpler replacement of weight balancing's two stages.

Loss = CE + lambda_wd / 2 * ||theta||^2 + lambda_fr / 2 * mean_i ||f_i||^2 with a fixed simplex-ETF
head. The weight-decay term is the optimiser's (coupled SGD) weight decay; the feature term is added
here. Post-hoc logit adjustment after model selection is the engine's `posthoc` step.
"""
from __future__ import annotations

import torch
from torch import nn

from longtail.errors import ConfigError
from longtail.methods.base import Method
from longtail.models.heads import ETFHead


class EWB(Method):
    """Every parameter trains on the base loss plus feature regularisation `method.feature_reg`."""

    def prepare(self, model: nn.Module) -> nn.Module:
        if not isinstance(model.head, ETFHead):
            raise ConfigError(
                f"method.name: ewb trains with a fixed simplex-ETF classifier, but model.head is "
                f"{self.cfg.model.head!r}; set model.head: etf"
            )
        return model

    def criterion(
        self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict]:
        squared = features.float().pow(2).sum(dim=1)
        regulariser = self.cfg.method.feature_reg / 2 * squared.mean()
        loss = self.base_loss(logits, y, progress) + regulariser
        return loss, {"feature_reg": regulariser.detach(), "feature_norm": squared.detach().sqrt().mean()}
