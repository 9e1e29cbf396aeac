"""The low-rank parametrization W = W_g + s * B A, switchable and mergeable: MORE's part and LoRA's.

Each chosen weight gets a `torch.nn.utils.parametrize` parametrization, so W_g stays the layer's own
parameter (a checkpoint of the decomposed model still names it); a plain Linear adds s (x A^T) B^T to
its output instead of building B A when that is cheaper. `general_only` switches every part off (MORE's
second pass); `merge` folds the parts into plain weights, so the exported model is the base
architecture with the base state-dict keys. MORE trains W_g with the part; LoRA freezes W_g.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class LowRank(nn.Module):
    """The parametrization W_g -> W_g + s * B A (B: out x r, A: r x fan_in), switchable off; A's bound is
    1/sqrt(fan_in), or 1/sqrt(r) for `init="lift"` (finetune.lora_init)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator, order: list[str],
                 init: str = "default"):
        super().__init__()
        self.order = order  # the owner's parameter names in registration order, restored by `merge`
        out, fan_in = weight.shape[0], weight[0].numel()
        # Kaiming-uniform with a = sqrt(5), nn.Linear's default: U(-1/sqrt(fan), 1/sqrt(fan)), fan = fan_in.
        # `lift`: LIFT stores A as fan_in x r (models/peft_modules.py LoRA), so kaiming_uniform_ takes its fan
        # from the second dimension, r. Drawn by hand because nn.init takes a generator only from torch 2.2 on.
        fan = rank if init == "lift" else fan_in
        a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan)
        self.A = nn.Parameter(a.to(weight))
        # B = 0: the decomposed model starts as exactly the plain model.
        self.B = nn.Parameter(torch.zeros(out, rank, dtype=weight.dtype, device=weight.device))
        self.scale = scale
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + self.scale * (self.B @ self.A).view_as(weight)


def _factored_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The decomposed Linear's output, computed as x W_g^T + s (x A^T) B^T when that is cheaper.

    Building B A costs out * r * in multiply-adds per forward (and again in backward), the factored form
    rows * r * (in + out). On an MLP with a batch of 128 the product alone cost as much as the layer;
    a large batch through a small layer favours building the weight, so the cheaper form is chosen per call.
    Several parts on one weight (MORE's `more.groups`) each add their own term, the switched-off ones none (a
    band's pass of `more.groups` is factored too).
    """
    chain = module.parametrizations.weight
    parts = [p for p in chain if p.enabled]
    fan_in, out = module.in_features, module.out_features
    rows = x.numel() // fan_in
    if not parts or rows * (fan_in + out) >= fan_in * out:
        return F.linear(x, module.weight, module.bias)
    y = F.linear(x, chain.original, module.bias)
    for part in parts:
        y = y + part.scale * F.linear(F.linear(x, part.A), part.B)
    return y


def add_lowrank(module: nn.Module, rank: int, scale: float, generator: torch.Generator,
                init: str = "default") -> LowRank:
    """Give `module.weight` a low-rank part in place (B = 0, so the outputs do not change yet); `init` is
    A's bound (`LowRank`)."""
    part = LowRank(module.weight, rank, scale, generator, order=list(module._parameters), init=init)
    # Only a plain nn.Linear: a subclass may compute differently, another parametrization changes W_g.
    factored = type(module).forward is nn.Linear.forward and not parametrize.is_parametrized(module, "weight")
    parametrize.register_parametrization(module, "weight", part)
    if factored:
        module.forward = types.MethodType(_factored_linear_forward, module)
    return part


def lowrank_parts(model: nn.Module) -> list[LowRank]:
    return [m for m in model.modules() if isinstance(m, LowRank)]


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every decomposed layer."""
    return [p for part in lowrank_parts(model) for p in (part.A, part.B)]


def lowrank_ratios(model: nn.Module) -> dict[str, float]:
    """||s B A||_F / ||W_g||_F of every decomposed layer, keyed by module path: how much the part weighs
    (several parts on one weight: their sum)."""
    ratios = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        parts = [p for p in module.parametrizations.weight if isinstance(p, LowRank)]
        if parts:
            # sum_g s_g B_g A_g = s_1 [B_1 .. (s_G / s_1) B_G] [A_1; ..; A_G]: one pair of stacked factors.
            s = parts[0].scale
            b = torch.cat([p.B.detach().double() * (p.scale / s) for p in parts], dim=1)
            a = torch.cat([p.A.detach().double() for p in parts], dim=0)
            # ||B A||_F^2 = tr(B^T B A A^T): two r x r products, never the out x fan_in matrix B A.
            delta = abs(s) * ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()
            ratios[name] = float(delta / module.parametrizations.weight.original.detach().double().norm())
    return ratios


@contextmanager
def general_only(model: nn.Module) -> Iterator[None]:
    """Inside the block every layer computes with W_g alone."""
    parts = lowrank_parts(model)
    for part in parts:
        part.enabled = False
    try:
        yield
    finally:
        for part in parts:
            part.enabled = True


@contextmanager
def switched(parts: list[LowRank], states: list[bool]) -> Iterator[None]:
    """Inside the block each of `parts` is on or off as `states` says; afterwards as it was."""
    saved = [part.enabled for part in parts]
    for part, state in zip(parts, states):
        part.enabled = state
    try:
        yield
    finally:
        for part, state in zip(parts, saved):
            part.enabled = state


def recompute_as_forward(model: nn.Module) -> Callable[[], tuple[ContextManager, ContextManager]]:
    """torch.utils.checkpoint's `context_fn` for `model`: the recomputation in backward runs with each part
    switched as it was in the forward.

    Backward recomputes a checkpointed layer after MORE's `general_only` block has switched the parts back
    on; without this the general pass's saved activations would be recomputed with the parts on. The parts
    are looked up per call, since MORE adds its own after checkpointing is enabled.
    """
    def context_fn() -> tuple[ContextManager, ContextManager]:
        parts = lowrank_parts(model)
        return nullcontext(), switched(parts, [part.enabled for part in parts])

    return context_fn


def merge(model: nn.Module) -> nn.Module:
    """Fold W_g + s B A into plain weights: the base architecture and state-dict keys, same outputs.

    A weight that carries other parametrizations besides the low-rank one has them folded in too. A
    frozen W_g (LoRA) stays frozen: the merged weight keeps W_g's requires_grad.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        parts = [p for p in module.parametrizations["weight"] if isinstance(p, LowRank)]
        if not parts:
            continue
        trains = module.parametrizations.weight.original.requires_grad
        for part in parts:
            part.enabled = True
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.requires_grad_(trains)
        module.__dict__.pop("forward", None)  # the factored Linear forward, back to the class's own
        # Re-registering moved `weight` last; restore the order so model.pt lists keys as the base model does.
        module._parameters = {k: module._parameters[k] for k in parts[0].order}
    return model
