"""The config's value checks that types alone cannot express, run by `longtail.config` before any work starts;
each error names the key and what is accepted. A rule of one method (zero_shot's, MORE's against finetune.*)
is that method's `check_config`, run by `longtail.methods.check_config`.

Layer: foundation. Imports only `errors` and the config schema.
"""
from __future__ import annotations

from longtail.config.schema import Config
from longtail.errors import ConfigError


def check_values(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs,
        "optim.lr": cfg.optim.lr,
        "eval.ece_bins": cfg.eval.ece_bins,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.every": cfg.eval.every,
        "train.accum_steps": cfg.train.accum_steps,
        "train.log_every": cfg.train.log_every,
        "data.mosaic_train_images": cfg.data.mosaic_train_images,
        "data.mosaic_test_images": cfg.data.mosaic_test_images,
        "model.width": cfg.model.width,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.data.resize_to is not None and cfg.data.resize_to < 8:
        raise ConfigError(f"data.resize_to: must be >= 8 pixels (or null), got {cfg.data.resize_to}")
    if not 0 <= cfg.train.seed < 2**32:
        raise ConfigError(f"train.seed: must be in [0, 2**32) (NumPy's seed range), got {cfg.train.seed}")
    if cfg.data.imbalance < 1:
        raise ConfigError(f"data.imbalance: must be >= 1 (max count / min count), got {cfg.data.imbalance}")
    if not 0 < cfg.data.minority_fraction <= 1:
        raise ConfigError(f"data.minority_fraction: must be in (0, 1], got {cfg.data.minority_fraction}")
    for key, value in {
        "data.val_per_class": cfg.data.val_per_class,
        "data.num_workers": cfg.data.num_workers,
        "optim.weight_decay": cfg.optim.weight_decay,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
        "train.track_every": cfg.train.track_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "more.amplitude": cfg.more.amplitude,
        # A negative tau would push the logits toward the frequent classes, the opposite of every adjustment.
        "posthoc.tau": cfg.posthoc.tau,
        "method.tau_norm_tau": cfg.method.tau_norm_tau,
    }.items():
        if value is not None and value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if any(m < 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones: every entry must be >= 0 (a fraction of training below 1, "
                          f"else an epoch), got {cfg.schedule.milestones}")
    _check_milestones(cfg.schedule.milestones)
    if not 0 < cfg.more.rank_ratio <= 1:
        raise ConfigError(f"more.rank_ratio: must be in (0, 1], got {cfg.more.rank_ratio}")
    if not 0 < cfg.eval.f1_threshold < 1:
        raise ConfigError(f"eval.f1_threshold: must be in (0, 1), got {cfg.eval.f1_threshold}")
    if cfg.eval.thresholds is not None:
        t = cfg.eval.thresholds
        if len(t) != 2 or t[0] < t[1]:
            raise ConfigError(f"eval.thresholds: expected [many, few] with many >= few, got {t}")
    grid = cfg.posthoc.grid
    if len(grid) != 3 or grid[0] < 0 or grid[2] <= 0 or grid[1] < grid[0]:
        raise ConfigError(f"posthoc.grid: expected [start, stop, step] with 0 <= start <= stop and step > 0, "
                          f"got {grid}")
    if cfg.posthoc.kind != "none" and cfg.model.head == "cosine":
        raise ConfigError("posthoc.kind: a cosine head normalises its weights, so a logit adjustment cannot be folded "
                          "into it; use model.head linear or etf, or posthoc.kind none")
    twice = sorted({name for name in cfg.train.loggers if cfg.train.loggers.count(name) > 1})
    if twice:
        raise ConfigError(f"train.loggers: {', '.join(twice)} listed twice; name each tracker once")
    _check_finetune(cfg)
    _check_text_head(cfg)
    _check_augmentation(cfg)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    if cfg.data.mean is not None and cfg.data.std is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("data.mean and data.std: must have the same number of channels")
    if cfg.data.std is not None and any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: every entry must be > 0, got {cfg.data.std}")


def _check_milestones(milestones: list[float]) -> None:
    """Fractions of training (below 1) or epoch numbers, not both, increasing: [0.5, 1.0] would be epoch 5 and
    then epoch 1 at 10 epochs."""
    fractions = [m < 1 for m in milestones]
    how = ("write all as fractions of training, e.g. [0.8, 0.9], or all as epoch numbers, e.g. [160, 180]; the end "
           "of training needs no milestone (the run stops there), and a fraction must stay below 1")
    if any(fractions) and not all(fractions):
        raise ConfigError(f"schedule.milestones: {milestones} mixes fractions of training (below 1) with epoch "
                          f"numbers (1 and above: 1.0 is epoch 1); {how}")
    if any(a >= b for a, b in zip(milestones, milestones[1:])):
        raise ConfigError(f"schedule.milestones: {milestones} must be increasing; {how}")


def _check_finetune(cfg: Config) -> None:
    """finetune.* against itself (MORE's rules against it: `More.check_config`)."""
    ft = cfg.finetune
    if ft.lora_rank < 1 or ft.lora_alpha <= 0:
        raise ConfigError(f"finetune.lora_rank / lora_alpha: must be >= 1 / > 0, got {ft.lora_rank} / {ft.lora_alpha}")
    if ft.adapter_dim < 1:
        raise ConfigError(f"finetune.adapter_dim: must be >= 1, got {ft.adapter_dim}")
    if not 0 <= ft.adapter_dropout < 1:
        raise ConfigError(f"finetune.adapter_dropout: must be in [0, 1), got {ft.adapter_dropout}")
    for key, default, mode in (("adapter_style", "adaptformer", "adaptformer"), ("adapter_dropout", 0.0, "adaptformer"),
                               ("full_scope", "all", "full"), ("lora_init", "default", "lora")):
        if getattr(ft, key) != default and ft.mode != mode:
            raise ConfigError(f"finetune.{key}: {getattr(ft, key)!r} applies to finetune.mode={mode} only, and "
                              f"finetune.mode is {ft.mode}; leave it at {default!r} or use finetune.mode={mode}")
    if ft.targets is not None and not ft.targets:
        raise ConfigError("finetune.targets: an empty list selects no layer; give patterns or null for the defaults")
    for key in ("lr_head", "lr_lowrank", "lr_adapter"):
        value = getattr(ft, key)
        if value is not None and value <= 0:
            raise ConfigError(f"finetune.{key}: must be > 0 or null (optim.lr), got {value}")
    if ft.lr_lowrank is not None and not (ft.mode == "lora" or cfg.more.enabled):
        raise ConfigError(f"finetune.lr_lowrank: {ft.lr_lowrank} sets the lr of low-rank parts, and "
                          f"finetune.mode={ft.mode} without MORE has none; use finetune.mode=lora or "
                          "more.enabled=true, or leave it null")
    if ft.lr_adapter is not None and ft.mode != "adaptformer":
        raise ConfigError(f"finetune.lr_adapter: {ft.lr_adapter} sets the lr of AdaptFormer's adapters, and "
                          f"finetune.mode={ft.mode} has none; use finetune.mode=adaptformer or leave it null")
    if ft.mode != "full" and cfg.method.name in HEAD_ONLY_METHODS:
        raise ConfigError(f"finetune.mode: method.name={cfg.method.name} loads a stage-1 model.pt, freezes its "
                          "backbone and retrains the classifier itself; set finetune.mode in the stage-1 run and "
                          "leave it full here")


# Stages that keep a stage-1 backbone frozen: what each trains instead.
HEAD_ONLY_METHODS = {"wb_stage2": "retrains only the classifier", "crt": "retrains only the classifier",
                     "lws": "learns only per-class logit scales", "tau_norm": "trains nothing"}


def _check_augmentation(cfg: Config) -> None:
    """The policy, Cutout and mixing keys' ranges, and where they are refused."""
    d = cfg.data
    if d.randaugment_n < 1:
        raise ConfigError(f"data.randaugment_n: must be >= 1 (ops per image), got {d.randaugment_n}")
    if not 0 <= d.randaugment_m <= 30:
        raise ConfigError(f"data.randaugment_m: must be a magnitude bin in 0..30, got {d.randaugment_m}")
    for key, value in {"data.cutout": d.cutout, "data.mixup_alpha": d.mixup_alpha,
                       "data.cutmix_alpha": d.cutmix_alpha}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0 (0: off), got {value}")
    chosen = {"data.policy": d.policy if d.policy != "none" else None, "data.mixup_alpha": d.mixup_alpha or None,
              "data.cutmix_alpha": d.cutmix_alpha or None}
    key, value = next(((k, v) for k, v in chosen.items() if v is not None), (None, None))
    if key is None:
        return
    if cfg.method.name in HEAD_ONLY_METHODS:
        raise ConfigError(f"{key}: {value!r} is refused with method.name={cfg.method.name}, which "
                          f"{HEAD_ONLY_METHODS[cfg.method.name]} on a frozen stage-1 backbone (and with "
                          "method.cache_features sees features computed once, which cannot be re-augmented): these "
                          "augmentations are for learning the representation (MiSLAS, Zhong et al. 2021, mixes in "
                          f"stage 1 only); set them in the stage-1 run and leave {key} at its default here")
    if cfg.finetune.mode == "linear":
        raise ConfigError(f"{key}: {value!r} is refused with finetune.mode=linear, which trains only the head on a "
                          "frozen backbone: these augmentations are for learning the representation; use "
                          "finetune.mode full, lora, bias or adaptformer, or leave the key at its default")


def _check_text_head(cfg: Config) -> None:
    m = cfg.model
    if m.head_init == "text" and (m.name != "hf_clip" or m.pretrained is None or m.head != "cosine"):
        raise ConfigError("model.head_init: text needs model.name hf_clip with model.pretrained (a whole CLIP "
                          "checkpoint: its text tower and tokenizer embed the class names) and model.head cosine")
    if m.clip_feature != "projected" and m.name != "hf_clip":
        raise ConfigError(f"model.clip_feature: {m.clip_feature} chooses hf_clip's feature, and model.name is "
                          f"{m.name}; leave it at projected")
    if not m.prompts or any("{}" not in p for p in m.prompts):
        raise ConfigError(f"model.prompts: every template needs a {{}} for the class name, got {m.prompts}")
