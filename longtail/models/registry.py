"""Model names -> backbone factories.

A factory is called as `factory(num_classes, in_channels, image_size, model_cfg)` and returns a
backbone with `features(x) -> (N, d)` and `feature_dim`; `build_model` attaches the head.
A user's own model is named by an import path `"package.module:factory"` instead of a registered name.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from longtail.config import ModelConfig
from longtail.errors import ConfigError

Factory = Callable[..., nn.Module]

MODELS: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make `factory` available as `model.name: <name>`."""

    def add(factory: Factory) -> Factory:
        if name in MODELS and MODELS[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def get_factory(name: str) -> Factory:
    """The factory for a registered name or a `"package.module:factory"` import path."""
    if ":" not in name:
        if name not in MODELS:
            known = ", ".join(sorted(MODELS))
            raise ConfigError(
                f"model.name: unknown model {name!r}; registered models: {known}; "
                "or give an import path 'package.module:factory'"
            )
        return MODELS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model.name: {name!r} is not an import path of the form 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.name: cannot import module {module_name!r} from {name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name: module {module_name!r} has no callable {attr!r} (from {name!r})")
    return factory


def no_pretrained(model_cfg: ModelConfig) -> None:
    """For factories without pretrained weights: refuse `model.pretrained` instead of ignoring it."""
    if model_cfg.pretrained is not None:
        raise ConfigError(
            f"model.pretrained: {model_cfg.name} has no pretrained weights to load; set model.pretrained: null "
            "(to start from an earlier run use method.init_from)"
        )
