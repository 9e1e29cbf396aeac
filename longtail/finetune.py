"""`finetune.mode`: which parameters of a (pretrained) backbone train. The head always trains.

full: everything; linear: the head alone (a linear probe); bias: biases and the head (BitFit);
lora: the chosen weights frozen, each with a trainable low-rank part W = W_g + s B A, s = alpha / rank
(`longtail.lowrank`, the part MORE uses, so LoRA + MORE shares one part per layer). The engine merges
the parts before export, so model.pt is the plain architecture.
adaptformer: everything frozen but a bottleneck adapter beside each chosen MLP block (AdaptFormer,
Chen et al. 2022: out = mlp(x) + s up(relu(down(x))), up = 0 at start). Adapters cannot merge: they stay
modules in model.pt, and model.yaml's `adapters` says where, so the model reloads.
"""
from __future__ import annotations

import fnmatch
import types

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.lowrank import add_lowrank, lowrank_parameters


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


class Adapter(nn.Module):
    """AdaptFormer's parallel bottleneck: s * up(relu(down(x)))."""

    def __init__(self, d: int, dim: int, scale: float):
        super().__init__()
        self.down = nn.Linear(d, dim)
        self.up = nn.Linear(dim, d)
        nn.init.zeros_(self.up.weight)  # zero: the adapted model starts as exactly the pretrained one
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


def _adapted_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x) + module.adapter(x)


def add_adapters(model: nn.Module, targets: list[str], dim: int, scale: float) -> list[str]:
    """An `adapter` submodule beside each matching MLP block (keys `<block>.adapter.*`, the block's own kept)."""
    head = {id(m) for m in model.head.modules()}
    chosen = [(name, m) for name, m in model.named_modules()
              if name and id(m) not in head and any(matches(name, t) for t in targets)]
    linears = [(name, [l for l in m.modules() if isinstance(l, nn.Linear)]) for name, m in chosen]
    if not chosen or any(not ls or ls[0].in_features != ls[-1].out_features for _, ls in linears):
        raise ConfigError(f"finetune.targets: adaptformer needs MLP blocks (Linear layers mapping d back to d) "
                          f"matching {targets}; found {[name for name, _ in chosen] or 'none'}")
    for (name, module), (_, ls) in zip(chosen, linears):
        module.adapter = Adapter(ls[0].in_features, dim, scale).to(ls[0].weight)
        module.forward = types.MethodType(_adapted_forward, module)
    return [name for name, _ in chosen]


def adapter_spec(model: nn.Module) -> dict | None:
    """model.yaml's `adapters`: which blocks carry one, its width and scale (None without adapters)."""
    found = [(name, m.adapter) for name, m in model.named_modules() if isinstance(getattr(m, "adapter", None), Adapter)]
    if not found:
        return None
    first = found[0][1]
    return {"blocks": [name for name, _ in found], "dim": first.down.out_features, "scale": first.scale}


def apply_finetune(model: nn.Module, cfg: Config) -> nn.Module:
    """Freeze what `finetune.mode` does not train and add LoRA's parts or the adapters, in place."""
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
    if ft.mode == "adaptformer":
        targets = ft.targets if ft.targets is not None else getattr(model, "adapter_targets", None)
        if targets is None:
            raise ConfigError(f"finetune.targets: model {cfg.model.name} ships no default AdaptFormer targets; "
                              "set finetune.targets to the names of its MLP blocks")
        add_adapters(model, targets, ft.adapter_dim, ft.adapter_scale)
    return model


def part_groups(model: nn.Module, groups: list[dict], cfg: Config) -> list[dict]:
    """The method's parameter groups with each part that has its own lr (`finetune.lr_head`, `lr_lowrank`,
    `lr_adapter`) moved to groups of its own, which keep the weight decay of the group each came from."""
    ft = cfg.finetune
    adapters = [p for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()]
    for lr, params in ((ft.lr_head, list(model.head.parameters())), (ft.lr_lowrank, lowrank_parameters(model)),
                       (ft.lr_adapter, adapters)):
        if lr is None:
            continue
        ids = {id(p) for p in params}
        moved = [{**g, "params": [p for p in g["params"] if id(p) in ids], "lr": lr} for g in groups]
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups] + moved
    return [g for g in groups if g["params"]]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, the low-rank parts included."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
