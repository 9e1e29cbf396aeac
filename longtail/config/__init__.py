"""The run configuration: typed sections, YAML files, dotted command-line overrides.

Every key has its default in `config.schema`, so the resolved `config.yaml` a run saves shows every setting.
Choices are `Literal` types, checked here as the sections are built; the value checks types cannot express
are `config.checks`. Validation happens before any work starts and names the bad key.

Layer: foundation. Imports only `errors` (and its own schema, checks and recipes); every other module may import it.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from longtail.config.checks import HEAD_ONLY_METHODS, check_values  # noqa: F401
from longtail.config.recipes import find_recipe, read_recipe, read_yaml  # noqa: F401
from longtail.config.schema import (Config, DataConfig, EvalConfig, FinetuneConfig, LossConfig,  # noqa: F401
                                    MethodConfig, ModelConfig, MoreConfig, OptimConfig, PosthocConfig,
                                    ScheduleConfig, TrainConfig)
from longtail.errors import ConfigError

log = logging.getLogger(__name__)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):
            value = str(value).lower()  # YAML reads `true` as a boolean; a choice "true" means the same
        if value not in typing.get_args(tp):
            allowed = ", ".join(str(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if typing.get_args(tp)[1] is Any:  # an opaque mapping (model.hf_config), kept as it is
            return dict(value)
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # NaN passes every range check (nan < 1 is false) and infinity passes "> 0"; no key means anything by them.
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def all_keys() -> list[str]:
    """Every dotted key of the config (`data.name`, ...)."""
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory)]


def takes_list(dotted: str) -> bool:
    """Whether a known dotted key's value is a list (`schedule.milestones`; `eval.thresholds`, which may be null)."""
    section, _, name = dotted.partition(".")
    section_type = typing.get_type_hints(Config).get(section)
    tp = typing.get_type_hints(section_type).get(name) if section_type else None
    return any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))


def closest_keys(typed: str, n: int = 2) -> list[str]:
    """The known keys nearest to a mistyped one, in its own section or any other (`train.warmup` ->
    `schedule.warmup_epochs`); a mistyped section (`trian`) gets the nearest section names."""
    if "." not in typed:
        return difflib.get_close_matches(typed, [f.name for f in dataclasses.fields(Config)], n)
    section, key = typed.split(".", 1)

    def score(known: str) -> float:  # by the key's name; of two as close, the one in the typed section
        other_section, other_key = known.split(".", 1)
        return (difflib.SequenceMatcher(None, key, other_key).ratio() + 0.2 * (key in other_key)
                + 0.05 * (other_section == section))

    ranked = sorted(all_keys(), key=score, reverse=True)
    best = score(ranked[0])
    return [k for k in ranked[:n] if score(k) >= max(0.6, best - 0.1)]


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        typed = f"{prefix + '.' if prefix else ''}{unknown[0]}"
        close = closest_keys(typed)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown key '{typed}' in {where}; {hint}known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line value is YAML: `5`, `0.05`, `true`, `null`, `[0.8, 0.9]`, `foo`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` pairs on a nested dict (validated later with everything else)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=5")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. optim.lr=0.05")
        section, key = parts
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{section}' is not a section")
        node[key] = _parse_scalar(text)
    return raw


def _read_deprecated(raw: dict) -> dict:
    """Deprecated keys read as the keys that replaced them, so old configs and run directories still load.

    more.lowrank_lr: the low-rank parts' lr is finetune.lr_lowrank, beside the other parts' lrs (lr_head,
    lr_adapter), and it is the one key that also reaches LoRA's parts without MORE. The old key acted only
    with more.enabled true; a null (every config.yaml saved before) is the default and is dropped silently.
    """
    more = raw.get("more")
    if not isinstance(more, dict) or "lowrank_lr" not in more:
        return raw
    more = dict(more)
    value = more.pop("lowrank_lr")
    raw = {**raw, "more": more}
    if value is None:
        return raw
    finetune = raw.get("finetune") if isinstance(raw.get("finetune"), dict) else {}
    if finetune.get("lr_lowrank") is not None:
        raise ConfigError(f"finetune.lr_lowrank: {finetune['lr_lowrank']} and more.lowrank_lr: {value} both set "
                          "the lr of the same low-rank parts; set only finetune.lr_lowrank (more.lowrank_lr is "
                          "deprecated)")
    if more.get("enabled") is not True:
        log.warning("more.lowrank_lr is deprecated and acts only with more.enabled true, so %s is ignored; use "
                    "finetune.lr_lowrank", value)
        return raw
    log.warning("more.lowrank_lr is deprecated: read as finetune.lr_lowrank=%s; use finetune.lr_lowrank", value)
    return {**raw, "finetune": {**finetune, "lr_lowrank": value}}


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, _read_deprecated(raw), "")
    check_values(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or a shipped recipe by name (or start from defaults), apply `k=v` overrides, validate."""
    raw = read_recipe(find_recipe(path)) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    from longtail.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(config: dict, prefix: str = "", sep: str = ".") -> dict:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1} (`sep` between the levels); a mapping-valued key
    (data.path_remap, model.hf_config) stays whole."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("path_remap", "hf_config"):
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten_saved(raw: dict) -> dict:
    """A saved config, completed with today's defaults and flattened.

    A run saved before a key existed ran with that key's default, so it compares equal to a config
    that spells the default out (resume checks, grouping seeds in reports).
    """
    return flatten(from_dict(raw).to_dict())


def resolve_epochs(value: float, epochs: int) -> int:
    """Epoch-valued settings below 1 are fractions of training (0.8 of 200 epochs = epoch 160)."""
    return int(round(value * epochs)) if value < 1 else int(value)
