"""MORE (model rebalancing, NeurIPS 2025): the discrepancy loss and its schedule on top of `longtail.lowrank`.

Each selected weight becomes W = W_g + s * B A (`longtail.lowrank`, the same part LoRA uses). Every step
runs the model twice: with the low-rank part (full) and without it (general only). L_MORE, the
class-prior-weighted discrepancy between the two outputs, penalises head-class samples most, which pushes
the low-rank part toward the tail classes. Its weight alpha(t) follows a schedule over training. After training the parts merge into plain
weights, so the exported model is the base architecture and costs nothing extra at inference.
"""
from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import HEAD_ONLY_METHODS, Config, MoreConfig
from longtail.errors import ConfigError
from longtail.inference import run_split
from longtail.lowrank import (add_lowrank, general_only, lowrank_parameters, lowrank_parts, lowrank_ratios, merge,
                              switched)
from longtail.methods.base import Method, RunInfo
from longtail.methods.more_variants import (band_prior, check_variants, feature_bands, frequency_bands, general_loss,
                                            importance_ranks, orthogonal_penalty, phase_boundary)
from longtail.mixing import MixedTargets
from longtail.task import MULTI_LABEL, SINGLE_LABEL, get_task, multilabel_groups

SUPPORTED_LAYERS: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
# Second stages retrain the classifier of a finished run (WB's MaxNorm even edits `head.weight` in place,
# which a decomposed head only computes): MORE belongs in the stage-1 run, whose model.pt is merged.
SECOND_STAGES = tuple(HEAD_ONLY_METHODS)  # they train on a frozen stage-1 backbone


def lowrank_rank(weight_shape: torch.Size | tuple[int, ...], rank_ratio: float) -> int:
    """r = max(1, round(rank_ratio * min(out, fan_in))); a conv weight is viewed as out x (in/groups*kh*kw)."""
    out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
    return max(1, round(rank_ratio * min(out, fan_in)))


def layer_types(names: list[str]) -> tuple[type[nn.Module], ...]:
    """`more.layers` names -> module classes; a kind MORE cannot decompose is an error, not a skip."""
    unknown = [n for n in names if n not in SUPPORTED_LAYERS]
    if unknown:
        raise ConfigError(
            f"more.layers: cannot decompose {unknown[0]!r}; supported layer kinds: {', '.join(SUPPORTED_LAYERS)}"
        )
    return tuple(SUPPORTED_LAYERS[n] for n in names)


def selected_layers(model: nn.Module, more: MoreConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `more.layers` and `more.exclude` select, trainable weights only."""
    kinds = layer_types(more.layers)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or any(fnmatch.fnmatchcase(name, p) for p in more.exclude):
            continue
        weight = module.weight
        # A buffer (fixed ETF head) or a frozen weight does not train, so it has nothing to rebalance.
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        chosen.append((name, module))
    if not chosen:
        raise ConfigError(
            f"more: no trainable layer of kinds {more.layers} is left after more.exclude={more.exclude}; "
            "loosen more.exclude or set more.enabled=false"
        )
    return chosen


def decompose(model: nn.Module, more: MoreConfig, seed: int = 0, ranks: Optional[dict[str, int]] = None) -> list[str]:
    """Add `more.groups` low-rank parts to every selected trainable weight in place; returns the module names.
    `ranks` (module name -> r) replaces the `rank_ratio` rule (`more.rank_allocation: importance`)."""
    chosen = selected_layers(model, more)
    generator = torch.Generator().manual_seed(seed)
    for name, module in chosen:
        rank = ranks[name] if ranks is not None else lowrank_rank(module.weight.shape, more.rank_ratio)
        for _ in range(more.groups):
            add_lowrank(module, rank, more.scale, generator)
    return [name for name, _ in chosen]


@contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BN still normalises with batch statistics, but its running statistics come out unchanged.

    The block updates throw-away copies. Copying the old values back in place instead would bump the
    buffers' version counters, which autograd checks: the full pass saved them for its backward.
    """
    saved = [
        (m, name, buf)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for name, buf in m.named_buffers(recurse=False)
        if name in ("running_mean", "running_var", "num_batches_tracked")
    ]
    for m, name, buf in saved:
        setattr(m, name, buf.clone())
    try:
        yield
    finally:
        for m, name, buf in saved:
            setattr(m, name, buf)


def alpha(schedule: str, amplitude: float, progress: float) -> float:
    """alpha(t) for progress = t / T; `amplitude` is the applied A (already times num_classes)."""
    angle = math.pi * progress
    if schedule == "sin":
        return amplitude * math.sin(angle)
    if schedule == "constant":
        return amplitude
    if schedule == "cosine":
        return amplitude * (1 + math.cos(angle)) / 2
    if schedule == "ramp":
        return amplitude * (1 - math.cos(angle)) / 2
    raise ConfigError(f"more.schedule: {schedule!r} is not allowed; choose one of: sin, constant, cosine, ramp")


def discrepancy(z_full: torch.Tensor, z_gen: torch.Tensor, kind: str, task: str = SINGLE_LABEL) -> torch.Tensor:
    """Per-sample discrepancy between the two passes (N,): squared l2 of the logits, or `kl` — of the softmax
    for single-label data, the summed per-class Bernoulli KLs for multi-label (`longtail.task`)."""
    if kind not in ("l2", "kl"):
        raise ConfigError(f"more.discrepancy: {kind!r} is not allowed; choose one of: l2, kl")
    return get_task(task).discrepancy(z_full.float(), z_gen.float(), kind)  # float: half-precision under AMP


def sample_weights(targets: torch.Tensor, class_prior: torch.Tensor, task: str = SINGLE_LABEL) -> torch.Tensor:
    """pi_y per sample; for multi-hot targets the mean prior of its positive labels (none: the smallest prior);
    for a mixed batch (`longtail.mixing.MixedTargets`) lam pi_a + (1 - lam) pi_b."""
    if isinstance(targets, MixedTargets):
        return targets.combine(lambda t: get_task(task).more_weights(t, class_prior))
    return get_task(task).more_weights(targets, class_prior)


def more_loss(
    z_full: torch.Tensor, z_gen: torch.Tensor, targets: torch.Tensor, class_prior: torch.Tensor, kind: str = "l2",
    task: str = SINGLE_LABEL,
) -> torch.Tensor:
    """L_MORE = mean_i w_i * discrepancy(z_full_i, z_gen_i), w_i = `sample_weights`."""
    return (sample_weights(targets, class_prior, task) * discrepancy(z_full, z_gen, kind, task)).mean()


def more_loss_multilabel(
    z_full: torch.Tensor,
    z_gen: torch.Tensor,
    targets_multihot: torch.Tensor,
    class_prior: torch.Tensor,
    kind: str = "l2",
) -> torch.Tensor:
    """L_MORE for multi-hot targets (N x C): each sample weighted by the mean prior of its positive labels."""
    if targets_multihot.ndim != 2:
        shape = tuple(targets_multihot.shape)
        raise ValueError(f"targets_multihot: expected an N x C multi-hot tensor, got shape {shape}")
    return more_loss(z_full, z_gen, targets_multihot, class_prior, kind, MULTI_LABEL)


@torch.no_grad()
def class_discrepancy(
    model: nn.Module, split: Any, device: torch.device, num_classes: int,
    forward: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batch_size: int = 512,
) -> list[Optional[float]]:
    """Mean ||z_full - z_gen||^2 per class over `split`, each sample once across processes; a multi-hot
    sample counts for each of its positive labels; None for a class with no sample.

    Eval transform and eval mode (BN running statistics, no dropout), so the numbers are a deterministic
    function of the weights and training's random streams are not touched. `forward` is the method's own
    (features, logits) pass, so the logits compared are the ones L_MORE compares.
    """
    def squared_distance(x: torch.Tensor) -> torch.Tensor:
        z_full = forward(model, x)[1]
        with general_only(model):
            z_gen = forward(model, x)[1]
        return (z_full.float() - z_gen.float()).pow(2).sum(dim=1)

    d, y = run_split(model, split, device, squared_distance, batch_size, "more diagnostics")
    d = d.double()
    if y.ndim == 2:  # multi-hot: a few dozen classes, so the N x C membership matrix is small
        member = (y > 0).double()
        sums, counts = member.T @ d, member.sum(dim=0)
    else:  # bincount, not one-hot: N x C would not fit for iNaturalist's 8142 classes
        sums = torch.bincount(y.long(), weights=d, minlength=num_classes)
        counts = torch.bincount(y.long(), minlength=num_classes)
    return [float(s / n) if n else None for s, n in zip(sums.tolist(), counts.tolist())]


def group_means(per_class: list[Optional[float]], groups: tuple[list[int], ...]) -> dict[str, Optional[float]]:
    """The mean of the per-class values in each of many / medium / few (None for an empty group)."""
    means = {}
    for name, ids in zip(("many", "medium", "few"), groups):
        present = [per_class[c] for c in ids if per_class[c] is not None]
        means[name] = sum(present) / len(present) if present else None
    return means


class More(Method):
    """Wraps another method: its forward and criterion, plus the general-only pass and L_MORE."""

    def __init__(self, inner: Method, cfg: Config, info: RunInfo):
        super().__init__(cfg, info, inner.base_loss)
        layer_types(cfg.more.layers)  # refuse unsupported kinds before any work starts
        check_variants(cfg, info)
        if cfg.method.name in SECOND_STAGES:
            raise ConfigError(
                f"more.enabled: MORE trains a whole model in one stage, but method.name={cfg.method.name} retrains "
                "the classifier of a stage-1 run; enable MORE in the stage-1 run instead (its model.pt is merged) "
                "or set more.enabled=false"
            )
        if type(inner).loss is not Method.loss:
            raise ConfigError(
                f"more.enabled: method {cfg.method.name} replaces the whole `loss` hook, so MORE cannot run its "
                "general-only pass through the method's forward and criterion; implement `forward`/`criterion` "
                "instead of `loss`, or set more.enabled=false"
            )
        self.inner = inner
        self.more = cfg.more
        self.amplitude = cfg.more.amplitude * info.num_classes
        self.class_prior = info.prior.to(info.device)
        bands = frequency_bands(info.class_counts, cfg.more.groups)
        self.band_priors = [band_prior(self.class_prior, band) for band in bands]
        self.general: list[nn.Parameter] = []  # what trains besides the low-rank parts (`prepare`)
        self.boundary = phase_boundary(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """One low-rank part per layer: with LoRA it is LoRA's, and a finetune.mode that trains no weight matrix
        leaves MORE nothing to decompose."""
        ft = cfg.finetune
        if ft.mode in ("linear", "bias", "adaptformer"):
            what = {"linear": "trains only the head", "bias": "trains only biases and the head",
                    "adaptformer": "trains only the adapters and the head"}[ft.mode]
            raise ConfigError(f"more.enabled: finetune.mode={ft.mode} {what}, so no trained weight matrix is left "
                              "for MORE's low-rank part; use finetune.mode=full or lora with MORE, or "
                              "more.enabled=false")
        if ft.mode != "lora":
            return
        default = MoreConfig()
        for key in ("rank_ratio", "scale", "layers", "exclude"):
            if getattr(cfg.more, key) != getattr(default, key):
                raise ConfigError(
                    f"more.{key}: with finetune.mode=lora MORE's low-rank part is the LoRA part, shaped by "
                    f"finetune.lora_rank, lora_alpha and targets; remove more.{key}={getattr(cfg.more, key)!r} "
                    "or use finetune.mode=full")

    def prepare(self, model: nn.Module) -> nn.Module:
        model = self.inner.prepare(model)
        if self.cfg.finetune.mode == "lora":
            # One low-rank part per layer: LoRA's parts (added with the model, W_g frozen) are MORE's.
            if not lowrank_parts(model):
                raise ConfigError("more.enabled with finetune.mode=lora: the model carries no LoRA part to rebalance")
        else:
            ranks = None
            if self.more.rank_allocation == "importance":
                uniform = {name: lowrank_rank(m.weight.shape, self.more.rank_ratio)
                           for name, m in selected_layers(model, self.more)}
                ranks = importance_ranks(model, uniform, self.probe_loss)
                self.info.extra["more_ranks"] = ranks
            if self.more.grouping == "features":
                bands = feature_bands(self.class_feature_means(model), self.info.class_counts, self.more.groups)
                self.band_priors = [band_prior(self.class_prior, band) for band in bands]
                self.info.extra["more_bands"] = bands
            decompose(model, self.more, seed=self.cfg.train.seed, ranks=ranks)
        lowrank = {id(p) for p in lowrank_parameters(model)}
        self.general = [p for p in model.parameters() if p.requires_grad and id(p) not in lowrank]
        if self.more.general_lr_scale == 0:
            for p in self.general:  # frozen for the whole run: left out of the optimiser
                p.requires_grad_(False)
        return model

    def probe_loss(self, model: nn.Module, batches: int = 4) -> torch.Tensor:
        """The base loss on the first `batches` training batches (the evaluation transform, the run's seed): what
        `more.rank_allocation: importance` measures the layers by."""
        split, total = self.info.data.train, 0
        self.inner.train_mode(model)
        for i, (x, y, _) in enumerate(split.batches(self.cfg.data.batch_size, seed=self.cfg.train.seed)):
            if i == batches:
                break
            features, logits = self.inner.forward(model, split.to_input(x, "cpu", train=False).double())
            total = total + self.inner.criterion(features, logits, y, 0.0)[0]
        return total

    @torch.no_grad()
    def class_feature_means(self, model: nn.Module) -> torch.Tensor:
        """The mean feature of each class over the training split (evaluation transform and mode, the model as
        it starts: `method.init_from`'s, or the initial weights): what `more.grouping: features` clusters."""
        device = next(model.parameters()).device
        features, y = run_split(model, self.info.data.train, device, lambda x: self.inner.forward(model, x)[0],
                                self.cfg.eval.batch_size, "class means")
        # One-hot rows for class ids; multi-hot targets count an image for each of its labels.
        onehot = (y if y.ndim == 2 else F.one_hot(y, self.info.num_classes)).double()
        return (onehot.T @ features.double()) / onehot.sum(dim=0).clamp(min=1)[:, None]

    def train_split(self, split: Any, model: nn.Module) -> Any:
        return self.inner.train_split(split, model)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The inner method's groups, A and B in a group of their own with `more.lowrank_weight_decay`; their lr
        (`finetune.lr_lowrank`) is set with the other parts' lrs, by `finetune.part_groups`."""
        groups = self.inner.param_groups(model)
        more = self.more
        if more.lowrank_weight_decay is None and more.general_lr_scale == 1:
            return groups  # A and B train like W_g (the default)
        lowrank = lowrank_parameters(model)
        ids = {id(p) for p in lowrank}
        split = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        if more.general_lr_scale != 1:  # `build_optimizer` multiplies the lr the group would have
            split = [{**g, "lr_scale": more.general_lr_scale} for g in split]
        wd = more.lowrank_weight_decay
        group = {"params": lowrank, "weight_decay": self.cfg.optim.weight_decay if wd is None else wd}
        return [g for g in split if g["params"]] + [group]

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.forward(model, x)

    def criterion(
        self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict]:
        return self.inner.criterion(features, logits, y, progress)

    def set_phase(self, model: nn.Module, first: bool) -> None:
        """`more.freeze_general_at`: before it the general parameters train and the low-rank parts are frozen,
        after it the other way round. A frozen parameter gets no gradient, so the optimiser skips it."""
        for p in self.general:
            p.requires_grad_(first)
        for p in lowrank_parameters(model):
            p.requires_grad_(not first)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict]:
        more, task = self.more, self.info.task
        boundary = self.boundary
        first = boundary is not None and progress < boundary
        if boundary is not None:
            self.set_phase(model, first)
        features, z_full = self.inner.forward(model, x)
        loss, logs = self.inner.criterion(features, z_full, y, progress)
        if first:  # B = 0 and frozen: the general-only model is the full one, and L_MORE is 0 exactly
            a, l_more, z_gen = 0.0, z_full.new_zeros((), dtype=torch.float32), z_full
        else:
            a = alpha(more.schedule, self.amplitude, progress if boundary is None else
                      (progress - boundary) / (1 - boundary))  # the schedule spans the second phase
            # The general pass needs a graph when a gradient flows through it: L_MORE's (alpha != 0, not
            # detached) or the general-only loss's.
            needs_grad = (a != 0 and not more.detach_general) or more.general_loss_weight > 0
            with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()), general_only(model), \
                    bn_stats_frozen(model):
                _, z_gen = self.inner.forward(model, x)
            compared = z_gen.detach() if more.detach_general else z_gen
            if more.groups == 1:
                l_more = more_loss(z_full, compared, y, self.class_prior, more.discrepancy, task)
            else:
                l_more = sum(more_loss(self.part_pass(model, x, g), compared, y, prior, more.discrepancy, task)
                             for g, prior in enumerate(self.band_priors))
        logs = {**logs, "more_alpha": a, "more_loss": l_more.detach()}
        loss = loss + a * l_more
        if more.general_loss_weight:
            l_gen = general_loss(z_gen, y, self.class_prior, task)
            logs["more_general_loss"] = l_gen.detach()
            loss = loss + more.general_loss_weight * l_gen
        if more.orthogonal_weight:
            l_orth = orthogonal_penalty(model)
            logs["more_orthogonal"] = l_orth.detach()
            loss = loss + more.orthogonal_weight * l_orth
        return loss, logs

    def part_pass(self, model: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
        """The logits with W_g and the g-th part of every layer (`more.groups`), BN statistics untouched."""
        parts = lowrank_parts(model)  # layer by layer, each layer's `groups` parts in order
        with switched(parts, [i % self.more.groups == g for i in range(len(parts))]), bn_stats_frozen(model):
            return self.inner.forward(model, x)[1]

    @classmethod
    def folds(cls, cfg: Config, method_record: dict) -> list[dict]:
        return [{"kind": "more_merge"}]

    def diagnostics(self, model: nn.Module, split: Any, device: torch.device) -> dict:
        """Where the low-rank part acts (logged every `train.track_every` epochs): the per-class discrepancy
        on `split`, its many / medium / few means, and every decomposed layer's ||s B A||_F / ||W_g||_F."""
        per_class = class_discrepancy(model, split, device, self.info.num_classes, self.inner.forward,
                                      self.cfg.eval.batch_size)
        # The task's groups: eval.thresholds, else a published head / medium / tail split, else the dataset's.
        groups = multilabel_groups(self.info.data, self.cfg)
        return {"more_discrepancy_per_class": per_class, "more_discrepancy": group_means(per_class, groups),
                "more_layer_ratio": lowrank_ratios(model)}

    def train_mode(self, model: nn.Module) -> None:
        self.inner.train_mode(model)

    def after_step(self, model: nn.Module) -> None:
        self.inner.after_step(model)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self.inner.after_epoch(model, epoch)

    def finalize(self, model: nn.Module) -> nn.Module:
        # Merge first, so the inner method's folding (EWB's post-hoc adjustment) acts on plain weights.
        return self.inner.finalize(merge(model))


def wrap_if_enabled(method: Method, cfg: Config, info: RunInfo) -> Method:
    """`build_method` calls this last: MORE around any method when `more.enabled` is true."""
    return More(method, cfg, info) if cfg.more.enabled else method
