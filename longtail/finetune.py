"""`finetune.mode`: which parameters of a (pretrained) backbone train. The head always trains.

full: everything; linear: the head alone (a linear probe); bias: biases and the head (BitFit);
lora: the chosen weights frozen, each with a trainable low-rank part W = W_g + s B A, s = alpha / rank
(`longtail.lowrank`, the part MORE uses, so LoRA + MORE shares one part per layer). The engine merges
the parts before export, so model.pt is the plain architecture.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.lowrank import add_lowrank


def matches(name: str, pattern: str) -> bool:
    """A target is a module-name suffix on dot boundaries (`q_proj`) or an fnmatch pattern on the full name."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def lora_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    head = {id(m) for m in model.head.modules()}
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in head and any(matches(name, t) for t in targets)]
    if not chosen:
        raise ConfigError(f"finetune.targets: no Linear or Conv2d layer of the backbone matches {targets}; "
                          "give module-name suffixes such as q_proj (see the model's named_modules())")
    return chosen


def apply_finetune(model: nn.Module, cfg: Config) -> nn.Module:
    """Freeze what `finetune.mode` does not train and add LoRA's parts, in place."""
    ft = cfg.finetune
    if ft.mode == "full":
        return model
    head = {id(p) for p in model.head.parameters()}
    for name, p in model.named_parameters():
        if id(p) not in head:
            p.requires_grad_(ft.mode == "bias" and name.rsplit(".", 1)[-1] == "bias")
    if ft.mode == "lora":
        targets = ft.targets if ft.targets is not None else getattr(model, "lora_targets", None)
        if targets is None:
            raise ConfigError(f"finetune.targets: model {cfg.model.name} ships no default LoRA targets; "
                              "set finetune.targets to module-name patterns")
        generator = torch.Generator().manual_seed(cfg.train.seed)
        for _, module in lora_layers(model, targets):
            add_lowrank(module, ft.lora_rank, ft.lora_alpha / ft.lora_rank, generator)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, the low-rank parts included."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
