"""Models: a backbone from the registry plus the head named in the config.

Contract for every model (built-in or a user's): `features(x) -> (N, d)` (penultimate: after the
last ReLU and pooling), `feature_dim = d`, attribute `head` (features -> logits), and
`forward(x) = head(features(x))`. A factory `f(num_classes, in_channels, image_size, model_cfg)`
returns the backbone; `build_model` attaches the head (replacing any the factory made). A backbone
may define `init_head(head)` to initialise or load the new head its own way, `spec_overrides()` for the
model.* keys model.yaml records instead of the config's, `lora_targets` and `adapter_targets`, the default
finetune.targets, `adapter_norm`, the name of the LayerNorm beside each MLP block that feeds it
(finetune.adapter_style lift), and `blocks()`, the transformer blocks (finetune.full_scope blocks).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from longtail.config import ModelConfig, from_dict
from longtail.errors import ConfigError
from longtail.models import hf, mlp, resnet, resnet_cifar  # noqa: F401  (they register their models)
from longtail.models.heads import CosineHead, ETFHead, LinearHead, build_head, scale_head
from longtail.models.registry import MODELS, get_factory, register

__all__ = [
    "MODELS", "register", "get_factory", "build_model", "model_spec", "load_exported", "state_dict_mismatch",
    "build_head", "scale_head", "LinearHead", "CosineHead", "ETFHead",
]


def _check_contract(model: nn.Module, name: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """Run two blank images through the model so a mismatch fails at build time with a clear message."""
    need = "a model needs features(x) -> (N, feature_dim), an int feature_dim and forward(x) = head(features(x))"
    x = torch.zeros(2, in_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.features(x)
            if not isinstance(feats, torch.Tensor) or feats.shape != (2, model.feature_dim):
                got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ConfigError(f"model.name: {name}: features() gave {got} for 2 images, expected "
                                  f"(2, {model.feature_dim}); {need}")
            logits = model(x)
            expected = model.head(feats)
            if not isinstance(logits, torch.Tensor) or logits.shape != (2, num_classes) or not torch.allclose(
                logits, expected, rtol=1e-4, atol=1e-5
            ):
                raise ConfigError(f"model.name: {name}: forward(x) is not head(features(x)) with {num_classes} "
                                  f"classes; {need}")
    finally:
        model.train(was_training)


def build_model(model_cfg: ModelConfig, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The backbone named by `model.name` with the head named by `model.head`."""
    model = get_factory(model_cfg.name)(num_classes, in_channels, image_size, model_cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {model_cfg.name} returned {type(model).__name__}, not a torch nn.Module")
    d = getattr(model, "feature_dim", None)
    if not callable(getattr(model, "features", None)) or not isinstance(d, int) or d < 1:
        raise ConfigError(
            f"model.name: {model_cfg.name} lacks a features(x) method or a positive int feature_dim; "
            "every model needs both (see longtail.models)"
        )
    head = build_head(model_cfg, d, num_classes)
    if hasattr(model, "init_head"):
        model.init_head(head)
    model.head = head
    _check_contract(model, model_cfg.name, num_classes, in_channels, image_size)
    return model


def model_spec(model_cfg: ModelConfig, model: nn.Module, num_classes: int, in_channels: int, image_size: int) -> dict:
    """What `model.yaml` records so that `model.pt` reloads into the same architecture.

    The head settings are read off `model.head`, because a method may have swapped it since the
    model was built (post-hoc adjustment folds an etf head into a linear one), and the engine folds the
    loss's logit scale into it before export (LDAM: a cosine head at `head_scale` 30, the config's 1
    times `loss.ldam_scale`; a linear head's weight and bias are scaled instead, so it stays at 1).
    """
    spec = dataclasses.asdict(model_cfg)
    del spec["pretrained"]  # the trained weights are in model.pt
    spec["head_init"] = "random"  # a text-initialised head's rows are in model.pt too
    if hasattr(model, "spec_overrides"):  # what the backbone read from its checkpoint (an HF architecture config)
        spec.update(model.spec_overrides())
    head = model.head
    if isinstance(head, CosineHead):
        spec.update(head="cosine", head_scale=head.scale)
    elif isinstance(head, (nn.Linear, ETFHead)):
        kind = "etf" if isinstance(head, ETFHead) else "linear"
        spec.update(head=kind, head_scale=1.0, head_bias=head.bias is not None)
    else:
        raise TypeError(f"cannot export a model whose head is a {type(head).__name__}: load_exported rebuilds only "
                        "LinearHead, CosineHead and ETFHead heads; fold it into one of those first")
    return {"model": spec, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}


# Bounds on what model.yaml may ask for, checked before anything is allocated (an edited num_classes: 1e11
# would otherwise try to build a 12.8 TB head).
SIZE_LIMITS = {"num_classes": 10**6, "in_channels": 16, "image_size": 8192}


def check_exported_sizes(spec: dict, state_dict: dict, where: str = "model.yaml") -> None:
    """Refuse a model.yaml whose sizes are not whole numbers in range, whose class names or counts do not number
    num_classes, or whose num_classes is not the number of rows of model.pt's head."""
    for key, limit in SIZE_LIMITS.items():
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ConfigError(f"{where}: {key}: {value!r} is not a whole number in 1..{limit}")
    n = spec["num_classes"]
    head = state_dict.get("head.weight")
    if isinstance(head, torch.Tensor) and head.shape[0] != n:
        raise ConfigError(f"{where}: num_classes {n}, but the model.pt beside it has a {head.shape[0]}-class head")
    data = spec.get("data")
    for key in ("class_names", "class_counts"):
        given = data.get(key) if isinstance(data, dict) else None
        if given is not None and (not isinstance(given, list) or len(given) != n):
            count = len(given) if isinstance(given, list) else type(given).__name__
            raise ConfigError(f"{where}: data.{key} holds {count} entries for num_classes {n}; give one per class")


def load_exported(spec: dict, state_dict: dict, where: str = "model.yaml") -> nn.Module:
    """Rebuild the architecture `spec` (a loaded `model.yaml`) describes and load `state_dict` into it."""
    keys = ("model", "num_classes", "in_channels", "image_size")
    if not isinstance(spec, dict) or any(k not in spec for k in keys) or not isinstance(spec["model"], dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(keys)} ('model' a mapping)")
    check_exported_sizes(spec, state_dict, where)
    model_cfg = from_dict({"model": {**spec["model"], "pretrained": None}}).model
    model = build_model(model_cfg, spec["num_classes"], spec["in_channels"], spec["image_size"])
    adapters = spec.get("adapters")
    if adapters:  # AdaptFormer's adapters do not merge: model.pt holds them as modules
        from longtail.finetune import add_adapters

        # model.yaml written before adapter styles existed holds longtail's own adapters
        add_adapters(model, adapters["blocks"], adapters["dim"], adapters["scale"],
                     style=adapters.get("style", "adaptformer"))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ConfigError(f"model.pt does not fit the architecture in model.yaml ({model_cfg.name}): "
                          f"{state_dict_mismatch(exc)}") from None
    return model


def state_dict_mismatch(exc: RuntimeError, shown: int = 2) -> str:
    """torch's load_state_dict error on one line: its first line only names the model class, each further one
    a key that does not fit."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
    more = f" (and {len(lines) - shown} more)" if len(lines) > shown else ""
    return " ".join(lines[:shown]) + more
