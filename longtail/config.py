"""The run configuration: typed sections, YAML files, dotted command-line overrides.

Every key has its default here, so the resolved `config.yaml` a run saves shows every setting.
Choices are `Literal` types; validation happens before any work starts and names the bad key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from longtail.errors import ConfigError


@dataclass
class DataConfig:
    # cifar10_lt | cifar100_lt | fashion_mnist_lt | imagenet_lt | places_lt | inat2018 | folder, and the
    # multi-label ones (docs/multilabel.md): multilabel_list | voc_mlt | coco_mlt | cifar10_mosaic_mlt |
    # fashion_mnist_mosaic_mlt
    name: str = "cifar10_lt"
    root: Optional[str] = None  # null: --data-root, else $LONGTAIL_DATA, else ~/.cache/longtail-data
    imbalance: float = 100.0
    profile: Literal["exp", "step", "none"] = "exp"  # none: keep the dataset's natural counts
    minority_fraction: float = 0.5
    selection: Literal["ldam", "first"] = "ldam"
    val_per_class: int = 0
    subset_seed: int = 0
    batch_size: int = 128
    sampler: Literal["instance", "class_balanced", "sqrt", "class_aware"] = "instance"
    num_workers: int = 0
    # resized_crop_flip: random-resized crop + flip, no colour jitter (LIFT's train transform, docs/foundation_models.md)
    augment: Literal["crop_flip", "resized_crop_flip", "flip", "none"] = "crop_flip"
    # After crop/flip, in this order (docs/augmentation.md): policy -> cutout -> normalise -> mixup / CutMix.
    policy: Literal["none", "autoaugment_cifar", "randaugment"] = "none"
    randaugment_n: int = 2  # ops per image
    randaugment_m: int = 9  # magnitude bin, 0..30
    cutout: int = 0  # side of the square set to 0 (pixels); 0: off
    mixup_alpha: float = 0.0  # lam ~ Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # 0: off; both > 0: one of the two per batch, each with probability 1/2
    mean: Optional[list[float]] = None  # null: the dataset's standard values (resolved in the saved config)
    std: Optional[list[float]] = None
    # list-file / folder datasets (decoded in workers)
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    test_list: Optional[str] = None
    class_names: Optional[str] = None  # list-file datasets: a file with one class name per line, in class-id order
    path_remap: Optional[dict[str, str]] = None
    on_bad_sample: Literal["error", "skip"] = "error"
    image_size: int = 224
    # multi-label datasets (docs/multilabel.md)
    class_names: Optional[str] = None  # multilabel_list: a file with one class name per line, in class-id order
    on_unlabelled: Literal["keep", "error"] = "keep"  # an image with no label: an all-negative sample, or an error
    mosaic_train_images: int = 5000  # cifar10_mosaic_mlt, fashion_mnist_mosaic_mlt
    mosaic_test_images: int = 2000
    # In-memory datasets: the model's input size, reached by a resize per batch on the device (null: hf_clip /
    # hf_vit's own size when it differs from the images', resolved in the saved config; the images' size: none).
    resize_to: Optional[int] = None
    # In-memory datasets (CIFAR, Fashion-MNIST) held on the training device, so batches need no host copy.
    # auto: on a GPU when the images take under half its free memory; never for file-decoding datasets.
    on_device: Literal["auto", "true", "false"] = "auto"


@dataclass
class ModelConfig:
    name: str = "resnet32"  # registry name or "package.module:factory"
    head: Literal["linear", "cosine", "etf"] = "linear"
    head_scale: float = 1.0
    head_bias: bool = True
    # resnets: a torchvision-format state dict file; hf_clip / hf_vit: a checkpoint directory or hub id
    pretrained: Optional[str] = None
    hf_config: Optional[dict[str, Any]] = None  # hf_clip / hf_vit: the architecture config (model.yaml records it)
    # hf_clip: text initialises the cosine head with CLIP's text embeddings of the class names in `prompts`
    head_init: Literal["random", "text"] = "random"
    prompts: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # several: their normalised mean
    # hf_clip's feature: projected (the image embedding CLIP's text tower shares) or pre_projection (the
    # post-LayerNorm CLS token before visual_projection, LIFT's; a text head's rows are then text @ W)
    clip_feature: Literal["projected", "pre_projection"] = "projected"
    width: int = 1024  # mlp hidden width
    etf_seed: int = 0


@dataclass
class LossConfig:
    # single-label: ce, cb, focal, ldam, la, bs, bce; multi-label: bce, focal_bce, cb_bce, dbl, db_focal, asl
    name: Literal["ce", "cb", "focal", "ldam", "la", "bs", "bce", "focal_bce", "cb_bce", "dbl", "db_focal",
                  "asl"] = "ce"
    tau: float = 1.0  # logit-adjusted loss
    beta: float = 0.9999  # class-balanced weights (cb, DRW)
    gamma: float = 1.0  # focal
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start: Optional[float] = None  # fraction of training (< 1) or epoch; null: no deferred re-weighting
    # multi-label losses (docs/multilabel.md#losses); dbl / db_focal defaults: DB-Loss's VOC-MLT config
    focal_bce_gamma: float = 2.0
    cb_bce_beta: float = 0.9
    db_alpha: float = 0.1
    db_beta: float = 10.0
    db_mu: float = 0.3
    db_neg_scale: float = 5.0  # lambda of the negative-tolerant regularisation
    db_kappa: float = 0.05  # kappa: the class-specific bias init_bias
    db_focal_gamma: float = 2.0
    db_focal_balance: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05


@dataclass
class MethodConfig:
    # erm | wb_stage2 | ewb | crt | lws | tau_norm | zero_shot | a name given to longtail.methods.register_method
    name: str = "erm"
    init_from: Optional[str] = None  # stage-1 run directory (or model.pt) that two-stage methods start from
    freeze_bn: bool = True  # two-stage methods: BN statistics frozen (eval mode) while the head trains
    maxnorm_thresh: float = 0.1
    maxnorm_every: Literal["step", "epoch", "never"] = "step"
    cb_variant: Literal["ce", "softmax_bce"] = "ce"
    cache_features: bool = False  # two-stage methods with data.augment=none: compute backbone features once
    feature_reg: float = 1.0e-2  # EWB lambda_fr
    tau_norm_tau: Optional[float] = 1.0  # tau-normalisation; null: search on val


@dataclass
class MoreConfig:
    enabled: bool = False
    rank_ratio: float = 0.1
    amplitude: float = 2.0  # A'; the applied amplitude is A = A' * num_classes
    schedule: Literal["sin", "constant", "cosine", "ramp"] = "sin"
    discrepancy: Literal["l2", "kl"] = "l2"
    detach_general: bool = False
    layers: list[str] = field(default_factory=lambda: ["Conv2d", "Linear"])
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on module names
    scale: float = 1.0  # s in W = W_g + s * B A
    lowrank_lr: Optional[float] = None  # null: optim.lr
    lowrank_weight_decay: Optional[float] = None  # null: optim.weight_decay


@dataclass
class FinetuneConfig:
    """Which parameters of the backbone train (docs/foundation_models.md); the head always trains."""

    mode: Literal["full", "linear", "bias", "lora", "adaptformer"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the low-rank part's scale is lora_alpha / lora_rank
    # A's initial bound: default 1/sqrt(fan_in) (nn.Linear's); lift 1/sqrt(lora_rank) (LIFT's LoRA)
    lora_init: Literal["default", "lift"] = "default"
    targets: Optional[list[str]] = None  # module-name suffixes or fnmatch patterns; null: the model's defaults
    adapter_dim: int = 64  # adaptformer: the bottleneck width
    adapter_scale: float = 0.1  # adaptformer: s in mlp(x) + s up(relu(down(x))); lift: s's initial value
    # adaptformer: longtail's adapter on the MLP's input, s fixed; lift: LIFT's (its own LayerNorm, reading the
    # residual stream before the block's pre-MLP LayerNorm, s learnt)
    adapter_style: Literal["adaptformer", "lift"] = "adaptformer"
    adapter_dropout: float = 0.0  # dropout after the adapter's ReLU (AdaptFormer's code uses 0.1)
    full_scope: Literal["all", "blocks"] = "all"  # full: every parameter, or the transformer blocks (LIFT's)
    # Learning rates per part (null: optim.lr, scaled and scheduled); a number is used as given, on the schedule.
    lr_head: Optional[float] = None
    lr_lowrank: Optional[float] = None  # LoRA's parts, and MORE's (the same parts under LoRA + MORE)
    lr_adapter: Optional[float] = None  # adaptformer's adapters


@dataclass
class PosthocConfig:
    kind: Literal["none", "multiplicative", "additive"] = "none"
    tau: Optional[float] = None  # null: search on the validation split
    grid: list[float] = field(default_factory=lambda: [0.0, 2.0, 0.05])  # start, stop, step
    # After `kind`: temperature scaling fitted on the validation split by NLL, folded into the head.
    calibrate: Literal["none", "temperature"] = "none"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2.0e-4
    wd_exclude_bn_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr * world_size * batch_size / base_batch_size
    base_batch_size: Optional[int] = None  # null: data.batch_size


@dataclass
class ScheduleConfig:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    warmup_epochs: float = 0.025  # fraction of training where < 1 (5 of 200 epochs), else epochs
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions where < 1
    gamma: float = 0.01  # LDAM-DRW: lr x0.01 at 80 %, x0.0001 at 90 %
    min_lr: float = 0.0  # cosine floor
    step_per: Literal["step", "epoch"] = "step"  # cosine: lr changes every optimiser step, or once an epoch


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False
    amp_dtype: Literal["float16", "bfloat16"] = "float16"  # with amp; float16 adds a GradScaler
    channels_last: bool = False
    compile: bool = False  # torch.compile the training step
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest convolution kernels (not deterministic)
    accum_steps: int = 1  # micro-batches per optimiser step (gradient accumulation)
    # Optimiser steps between reads of the logged values and the non-finite / stop flags (the GPU is waited
    # for only then), progress-bar and TensorBoard updates.
    log_every: int = 50
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: at epoch ends only
    track_every: int = 0  # epochs between FDR / BN-gamma tracking (and MORE diagnostics); 0: off
    sync_bn: bool = False
    find_unused_parameters: bool = False  # DDP: allow parameters that get no gradient in some steps
    grad_checkpoint: bool = False  # hf_clip / hf_vit: recompute each layer's activations in backward (less memory)


@dataclass
class EvalConfig:
    split: Literal["test", "val"] = "test"
    select: Literal["final", "best_val", "best_test"] = "final"
    thresholds: Optional[list[int]] = None  # [many, few]; null: dataset default
    f1_threshold: float = 0.5  # multi-label: a label is predicted when sigmoid(logit) > this (logit > 0 at 0.5)
    ece_bins: int = 15
    tta: Literal["none", "flip", "lift_crops"] = "none"  # lift_crops: LIFT's five crops, logits averaged
    batch_size: int = 512
    every: int = 1  # epochs between evaluations during training


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    more: MoreConfig = field(default_factory=MoreConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    posthoc: PosthocConfig = field(default_factory=PosthocConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown key '{prefix + '.' if prefix else ''}{unknown[0]}' in {where}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
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
        "loss.focal_bce_gamma": cfg.loss.focal_bce_gamma,
        "loss.db_alpha": cfg.loss.db_alpha,
        "loss.db_kappa": cfg.loss.db_kappa,
        "loss.db_focal_gamma": cfg.loss.db_focal_gamma,
        "loss.asl_gamma_neg": cfg.loss.asl_gamma_neg,
        "loss.asl_gamma_pos": cfg.loss.asl_gamma_pos,
        "data.val_per_class": cfg.data.val_per_class,
        "data.num_workers": cfg.data.num_workers,
        "optim.weight_decay": cfg.optim.weight_decay,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
        "train.track_every": cfg.train.track_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "more.amplitude": cfg.more.amplitude,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if any(m < 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones: every entry must be >= 0 (a fraction of training below 1, "
                          f"else an epoch), got {cfg.schedule.milestones}")
    if not 0 < cfg.more.rank_ratio <= 1:
        raise ConfigError(f"more.rank_ratio: must be in (0, 1], got {cfg.more.rank_ratio}")
    if not 0 <= cfg.loss.cb_bce_beta < 1:
        raise ConfigError(f"loss.cb_bce_beta: must be in [0, 1), got {cfg.loss.cb_bce_beta}")
    if not 0 <= cfg.loss.asl_clip < 1:
        raise ConfigError(f"loss.asl_clip: must be in [0, 1), got {cfg.loss.asl_clip}")
    for key, value in {"loss.db_neg_scale": cfg.loss.db_neg_scale, "loss.db_beta": cfg.loss.db_beta,
                       "loss.db_focal_balance": cfg.loss.db_focal_balance}.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if not 0 < cfg.eval.f1_threshold < 1:
        raise ConfigError(f"eval.f1_threshold: must be in (0, 1), got {cfg.eval.f1_threshold}")
    if cfg.eval.thresholds is not None:
        t = cfg.eval.thresholds
        if len(t) != 2 or t[0] < t[1]:
            raise ConfigError(f"eval.thresholds: expected [many, few] with many >= few, got {t}")
    if len(cfg.posthoc.grid) != 3 or cfg.posthoc.grid[2] <= 0 or cfg.posthoc.grid[1] < cfg.posthoc.grid[0]:
        raise ConfigError(f"posthoc.grid: expected [start, stop, step] with step > 0, got {cfg.posthoc.grid}")
    if cfg.posthoc.kind != "none" and cfg.model.head == "cosine":
        raise ConfigError("posthoc.kind: a cosine head normalises its weights, so a logit adjustment cannot be folded "
                          "into it; use model.head linear or etf, or posthoc.kind none")
    _check_finetune(cfg)
    _check_text_head(cfg)
    _check_augmentation(cfg)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    if cfg.data.mean is not None and cfg.data.std is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("data.mean and data.std: must have the same number of channels")
    if cfg.data.std is not None and any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: every entry must be > 0, got {cfg.data.std}")


def _check_finetune(cfg: Config) -> None:
    """finetune.* against itself and against MORE: one low-rank part per layer."""
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
    if ft.lr_lowrank is not None and cfg.more.lowrank_lr is not None:
        raise ConfigError(f"finetune.lr_lowrank: {ft.lr_lowrank} and more.lowrank_lr: {cfg.more.lowrank_lr} both set "
                          "the lr of the same low-rank parts; set only one")
    if ft.lr_adapter is not None and ft.mode != "adaptformer":
        raise ConfigError(f"finetune.lr_adapter: {ft.lr_adapter} sets the lr of AdaptFormer's adapters, and "
                          f"finetune.mode={ft.mode} has none; use finetune.mode=adaptformer or leave it null")
    if ft.mode != "full" and cfg.method.name in ("wb_stage2", "crt", "lws", "tau_norm"):
        raise ConfigError(f"finetune.mode: method.name={cfg.method.name} loads a stage-1 model.pt, freezes its "
                          "backbone and retrains the classifier itself; set finetune.mode in the stage-1 run and "
                          "leave it full here")
    if not cfg.more.enabled or ft.mode == "full":
        return
    if ft.mode in ("linear", "bias", "adaptformer"):
        what = {"linear": "trains only the head", "bias": "trains only biases and the head",
                "adaptformer": "trains only the adapters and the head"}[ft.mode]
        raise ConfigError(f"more.enabled: finetune.mode={ft.mode} {what}, so no trained weight matrix is left for "
                          "MORE's low-rank part; use finetune.mode=full or lora with MORE, or more.enabled=false")
    default = MoreConfig()
    for key in ("rank_ratio", "scale", "layers", "exclude"):
        if getattr(cfg.more, key) != getattr(default, key):
            raise ConfigError(
                f"more.{key}: with finetune.mode=lora MORE's low-rank part is the LoRA part, shaped by "
                f"finetune.lora_rank, lora_alpha and targets; remove more.{key}={getattr(cfg.more, key)!r} "
                "or use finetune.mode=full")


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
    if m.clip_feature != "projected" and cfg.method.name == "zero_shot":
        raise ConfigError(f"model.clip_feature: {m.clip_feature} gives logits other than CLIP's zero-shot ones, "
                          "which method.name zero_shot evaluates; use model.clip_feature projected")
    if not m.prompts or any("{}" not in p for p in m.prompts):
        raise ConfigError(f"model.prompts: every template needs a {{}} for the class name, got {m.prompts}")
    if cfg.method.name == "zero_shot" and (m.head_init != "text" or cfg.more.enabled):
        raise ConfigError("method.name: zero_shot evaluates the text-initialised head untrained; it needs "
                          "model.head_init text and more.enabled false")


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


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return raw


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply `k=v` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    from longtail.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; a mapping-valued key (data.path_remap, model.hf_config)
    stays whole."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("path_remap", "hf_config"):
            out.update(flatten(value, f"{prefix}{key}."))
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
