"""The documented entry points of the one training engine, where users' code imports them from
(`from longtail.engine import fit, evaluate_run, collect_logits, load_run`).

The code lives in its layer (docs/extending.md#layout): `training/` (fit, setup, the step loop, optimiser and
schedule, stop signals, checkpoints and resume), `inference` (evaluation), `rundir` (the exported model and
finished runs) and `runtime` (device, seeds). This module only re-exports them.

Layer: tools. Nothing in the package imports it.
"""
from longtail.inference import collect_features, collect_logits, eval_precision, evaluate, run_split
from longtail.methods import training_folds
from longtail.rundir import (LoadedRun, calibrate, eval_transform, evaluate_run, export_model, folded_temperature,
                             load_model, load_run, model_file, score_model)
from longtail.runtime import epoch_generator, restore_rng, rng_state, seed_everything, select_device
from longtail.training.checkpointing import RESUME_FREE_KEYS, config_differences, resume_loop, save_checkpoint
from longtail.training.fit import augmentation_summary, finish, fit, precision, precision_hint
from longtail.training.loop import build_loop, needs_two_samples, train_one_epoch
from longtail.training.optim import build_optimizer, effective_batch_size, effective_lr, lr_factor, resolved_schedule
from longtail.training.setup import Run, place_splits, setup
from longtail.training.state import Loop
from longtail.training.stopping import Preempted, StopFlag, stop_signals

__all__ = [
    "LoadedRun", "Loop", "Preempted", "RESUME_FREE_KEYS", "Run", "StopFlag", "augmentation_summary", "build_loop",
    "build_optimizer", "calibrate", "collect_features", "collect_logits", "config_differences",
    "effective_batch_size", "effective_lr", "epoch_generator", "eval_precision", "eval_transform", "evaluate",
    "evaluate_run", "export_model", "finish", "fit", "folded_temperature", "load_model", "load_run", "lr_factor",
    "model_file", "needs_two_samples", "place_splits", "precision", "precision_hint", "resolved_schedule",
    "restore_rng", "resume_loop", "rng_state", "run_split", "save_checkpoint", "score_model", "seed_everything",
    "select_device", "setup", "stop_signals", "train_one_epoch", "training_folds",
]
