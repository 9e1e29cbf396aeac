"""The config's schema: one dataclass per section, every key with its default (the resolved config.yaml a
run saves shows each one). Choices are `Literal` types, which `longtail.config` enforces when it builds them.

Layer: foundation. Imports nothing of the package.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


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
    # list-file and multilabel_list datasets: a file with one class name per line, in class-id order
    class_names: Optional[str] = None
    path_remap: Optional[dict[str, str]] = None
    on_bad_sample: Literal["error", "skip"] = "error"
    image_size: int = 224
    # multi-label datasets (docs/multilabel.md)
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
    # resnets: a state dict file (key layout: docs/large_datasets.md#pretrained-backbones); hf_clip / hf_vit: a
    # checkpoint directory or hub id
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
    lowrank_weight_decay: Optional[float] = None  # null: optim.weight_decay
    # Variants (docs/methods/more.md#variants), each off at its default:
    general_lr_scale: float = 1.0  # the lr of everything but the low-rank parts, times this (0: frozen)
    freeze_general_at: Optional[float] = None  # fraction of training: general part first, then low-rank parts only
    general_loss_weight: float = 0.0  # prior-weighted cross-entropy of the general-only logits
    groups: int = 1  # bands of classes, one low-rank part each
    grouping: Literal["frequency", "features"] = "frequency"  # bands by training count or by class-mean features
    orthogonal_weight: float = 0.0  # penalty ||s B A W_g^T||^2 / ||W_g||^2
    rank_allocation: Literal["uniform", "importance"] = "uniform"


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
    # for only then), progress-bar and tracker (`loggers`) updates.
    log_every: int = 50
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: at epoch ends only
    track_every: int = 0  # epochs between FDR / BN-gamma tracking (and MORE diagnostics); 0: off
    sync_bn: bool = False
    find_unused_parameters: bool = False  # DDP: allow parameters that get no gradient in some steps
    grad_checkpoint: bool = False  # hf_clip / hf_vit: recompute each layer's activations in backward (less memory)
    # Where the curves, the settings and the final metrics go besides metrics.jsonl (docs/config.md#train);
    # mlflow and wandb need their extras.
    loggers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])


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
    amp: bool = False  # evaluate under autocast in train.amp_dtype (channels_last input under train.channels_last)


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
