"""Method registry: `method.name` -> the class implementing it (imported on first use)."""
from __future__ import annotations

import importlib

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.losses import check_loss_config, logit_scale
from longtail.methods.base import LossFn, Method, RunInfo
from longtail.models.registry import get_factory
from longtail.runtime import check_device_name

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


def method_class(name: str) -> type[Method]:
    """The class `method.name: name` names (its module imported on first use)."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(METHODS))} "
                          "(add your own with longtail.methods.register_method)")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_config(cfg: Config) -> None:
    """The configured method's own rules (`Method.check_config`), and MORE's when it is enabled. `longtail.config`
    cannot import the methods, so what loads a config to run it calls this too, before any work starts:
    `training.setup`, the train command (before --download-weights), sweep and reproduce (before any point).
    The `loss` keys' ranges are the loss Modules' own (`longtail.losses.check_loss_config`)."""
    check_loss_config(cfg.loss)
    get_factory(cfg.model.name)  # a misspelt model or device is refused before a sweep runs its other points
    check_device_name(cfg.train.device)
    method_class(cfg.method.name).check_config(cfg)
    if cfg.more.enabled:
        from longtail.methods.more import More

        More.check_config(cfg)


def build_method(cfg: Config, info: RunInfo, base_loss: LossFn) -> Method:
    method = method_class(cfg.method.name)(cfg, info, base_loss)
    if cfg.more.enabled:
        from longtail.methods.more import wrap_if_enabled

        method = wrap_if_enabled(method, cfg, info)
    return method


def training_folds(cfg: Config, method_record: dict) -> list[dict]:
    """What `finish` has folded into the model before the post-hoc steps, in order, as model.yaml records it:
    MORE's merge, LoRA's, the method's own folds (`Method.folds`), the loss's logit scale."""
    folds = []
    if cfg.more.enabled:
        from longtail.methods.more import More

        folds += More.folds(cfg, method_record)
    if cfg.finetune.mode == "lora":  # with MORE the same parts: more_merge then names them too
        folds.append({"kind": "lora_merge", "rank": cfg.finetune.lora_rank,
                      "scale": cfg.finetune.lora_alpha / cfg.finetune.lora_rank})
    # A method registered in the process that trained the run, but not in this one, folded nothing we know of.
    folds += method_class(cfg.method.name).folds(cfg, method_record) if cfg.method.name in METHODS else []
    if logit_scale(cfg.loss) != 1.0:
        folds.append({"kind": "logit_scale", "scale": logit_scale(cfg.loss)})
    return folds
