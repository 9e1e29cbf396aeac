"""Method registry: `method.name` -> the class implementing it (imported on first use)."""
from __future__ import annotations

import importlib

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.methods.base import LossFn, Method, RunInfo

METHODS: dict[str, str] = {
    "erm": "longtail.methods.base:Method",
    "wb_stage2": "longtail.methods.weight_balancing:WBStage2",
    "ewb": "longtail.methods.ewb:EWB",
    "crt": "longtail.methods.decoupled:CRT",
    "lws": "longtail.methods.decoupled:LWS",
    "tau_norm": "longtail.methods.decoupled:TauNorm",
    "zero_shot": "longtail.methods.base:ZeroShot",
}


def register_method(name: str, target: str) -> None:
    """Add a method: `target` is "package.module:Class" (a `Method` subclass)."""
    METHODS[name] = target


def build_method(cfg: Config, info: RunInfo, base_loss: LossFn) -> Method:
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.method.name!r}; known: {', '.join(sorted(METHODS))} "
                          "(add your own with longtail.methods.register_method)")
    module, cls = METHODS[cfg.method.name].split(":")
    method = getattr(importlib.import_module(module), cls)(cfg, info, base_loss)
    if cfg.more.enabled:
        from longtail.methods.more import wrap_if_enabled

        method = wrap_if_enabled(method, cfg, info)
    return method
