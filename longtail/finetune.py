"""`finetune.mode`: which parameters of a (pretrained) backbone train. The head always trains.

full: everything (full_scope all), or the transformer blocks and the head (blocks, LIFT's full_tuning);
linear: the head alone (a linear probe); bias: biases and the head (BitFit);
lora: the chosen weights frozen, each with a trainable low-rank part W = W_g + s B A, s = alpha / rank
(`longtail.lowrank`, the part MORE uses, so LoRA + MORE shares one part per layer). The engine merges
the parts before export, so model.pt is the plain architecture.
adaptformer: everything frozen but a bottleneck adapter beside each chosen MLP block (AdaptFormer,
Chen et al. 2022: out = mlp(x) + s up(relu(down(x))), up = 0 at start), or LIFT's (adapter_style lift:
out = mlp(ln(h)) + s up(relu(down(ln'(h)))) on the residual stream h, ln' its own, s learnt). Adapters cannot
merge: they stay modules in model.pt, and model.yaml's `adapters` says where and which, so the model reloads.
"""
from __future__ import annotations

import fnmatch
import math
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
    """AdaptFormer's parallel bottleneck: s * up(dropout(relu(down(x)))), up = 0 so training starts from the
    pretrained model. `lift` is LIFT's (models/peft_modules.py AdaptFormer): a LayerNorm of its own first, down
    Kaiming-normal with zero bias, and s a parameter (initialised to `scale`)."""

    def __init__(self, d: int, dim: int, scale: float, dropout: float = 0.0, style: str = "adaptformer"):
        super().__init__()
        self.norm = nn.LayerNorm(d) if style == "lift" else nn.Identity()
        self.down = nn.Linear(d, dim)
        self.up = nn.Linear(dim, d)
        if style == "lift":
            nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.tensor([float(scale)])) if style == "lift" else scale
        self.dropout = dropout
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(self.norm(x))), self.dropout, self.training)
        return self.scale * self.up(h)


def _adapted_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x) + module.adapter(x)


def _lift_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The block's pre-MLP LayerNorm moved here (the identity in its place), so x is the residual stream the
    # adapter reads, beside the whole MLP branch: out = mlp(norm(x)) + adapter(x), as LIFT's models/peft_vit.py.
    return type(module).forward(module, module.norm(x)) + module.adapter(x)


def add_adapters(model: nn.Module, targets: list[str], dim: int, scale: float, dropout: float = 0.0,
                 style: str = "adaptformer") -> list[str]:
    """An `adapter` submodule beside each matching MLP block (keys `<block>.adapter.*`, the block's own kept).
    `lift` also moves the LayerNorm before each block (the backbone's `adapter_norm`, a sibling of the block)
    into it as `<block>.norm`."""
    head = {id(m) for m in model.head.modules()}
    chosen = [(name, m) for name, m in model.named_modules()
              if name and id(m) not in head and any(matches(name, t) for t in targets)]
    linears = [(name, [l for l in m.modules() if isinstance(l, nn.Linear)]) for name, m in chosen]
    if not chosen or any(not ls or ls[0].in_features != ls[-1].out_features for _, ls in linears):
        raise ConfigError(f"finetune.targets: adaptformer needs MLP blocks (Linear layers mapping d back to d) "
                          f"matching {targets}; found {[name for name, _ in chosen] or 'none'}")
    norm_name = getattr(model, "adapter_norm", None)
    parents = [model.get_submodule(name.rpartition(".")[0]) for name, _ in chosen]
    if style == "lift" and (norm_name is None or not all(isinstance(getattr(p, norm_name, None), nn.LayerNorm)
                                                         for p in parents)):
        raise ConfigError(f"finetune.adapter_style: lift reads the residual stream before the LayerNorm that feeds "
                          f"each MLP block; model {type(model).__name__} names no such LayerNorm beside "
                          f"{[name for name, _ in chosen]} (adapter_norm: {norm_name}); use adapter_style adaptformer")
    for (name, module), (_, ls), parent in zip(chosen, linears, parents):
        module.adapter = Adapter(ls[0].in_features, dim, scale, dropout, style).to(ls[0].weight)
        if style == "lift":
            module.norm = getattr(parent, norm_name)
            setattr(parent, norm_name, nn.Identity())
        module.forward = types.MethodType(_lift_forward if style == "lift" else _adapted_forward, module)
    return [name for name, _ in chosen]


def adapter_spec(model: nn.Module) -> dict | None:
    """model.yaml's `adapters`: which blocks carry one, its width, scale and style (None without adapters)."""
    found = [(name, m.adapter) for name, m in model.named_modules() if isinstance(getattr(m, "adapter", None), Adapter)]
    if not found:
        return None
    first = found[0][1]
    # lift's scale is a trained parameter, each block's in model.pt; the first block's is shown
    scale = float(first.scale.detach()) if first.style == "lift" else first.scale
    return {"blocks": [name for name, _ in found], "dim": first.down.out_features, "scale": scale, "style": first.style}


def apply_finetune(model: nn.Module, cfg: Config) -> nn.Module:
    """Freeze what `finetune.mode` does not train and add LoRA's parts or the adapters, in place."""
    ft = cfg.finetune
    if ft.mode == "full":
        if ft.full_scope == "blocks":  # LIFT's full_tuning: the transformer blocks, not embeddings, norms, projection
            if not hasattr(model, "blocks"):
                raise ConfigError(f"finetune.full_scope: blocks trains the transformer blocks, and model "
                                  f"{cfg.model.name} names none (hf_clip and hf_vit do); use full_scope all")
            trained = {id(p) for p in [*model.blocks().parameters(), *model.head.parameters()]}
            for p in model.parameters():
                p.requires_grad_(id(p) in trained)
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
            add_lowrank(module, ft.lora_rank, ft.lora_alpha / ft.lora_rank, generator, ft.lora_init)
    if ft.mode == "adaptformer":
        targets = ft.targets if ft.targets is not None else getattr(model, "adapter_targets", None)
        if targets is None:
            raise ConfigError(f"finetune.targets: model {cfg.model.name} ships no default AdaptFormer targets; "
                              "set finetune.targets to the names of its MLP blocks")
        add_adapters(model, targets, ft.adapter_dim, ft.adapter_scale, ft.adapter_dropout, ft.adapter_style)
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
