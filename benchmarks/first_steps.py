"""Print the first training steps of a config one by one: where does a run become unstable?

    python benchmarks/first_steps.py configs/cifar10_lt/ce_more.yaml train.epochs=10 --steps 40

Per step: learning rate, loss, and for MORE alpha(t) and L_MORE, the gradient norm and the largest
absolute logit on 16 training images. It runs the engine's own pieces (setup, optimiser, schedule,
the method's loss and after-step hook, the same batches and augmentation draws as a one-process run) on the first
steps of epoch 0, without writing a run directory.
"""
from __future__ import annotations

import argparse

import torch

from longtail.config import load_config
from longtail.engine import build_optimizer, epoch_generator, lr_factor, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    run = setup(cfg)
    model, method, data, device = run.model, run.method, run.data, run.device
    optimizer = build_optimizer(cfg, method.param_groups(model))
    steps = run.info.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    augment = epoch_generator(cfg.train.seed, 0, purpose=1)  # the engine's draws for epoch 0 on one process
    method.train_mode(model)
    batches = data.train.batches(cfg.data.batch_size, sampler=cfg.data.sampler, seed=cfg.train.seed, epoch=0)
    for i, (x, y, _) in zip(range(args.steps), batches):
        x = data.train.to_input(x, device, train=True, generator=augment)
        loss, logs = method.loss(model, x, y.to(device), i / (cfg.train.epochs * steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        scheduler.step()
        method.after_step(model)  # e.g. WB's per-step MaxNorm, as the engine applies it
        with torch.no_grad():
            largest_logit = model(x[:16]).abs().max().item()
        more = (f" alpha {logs['more_alpha']:.2f} L_MORE {float(logs['more_loss']):.3g}"
                if "more_alpha" in logs else "")
        print(f"step {i:3d} lr {optimizer.param_groups[0]['lr']:.4f} loss {loss.item():.4f}{more} "
              f"grad norm {grad_norm:.3g} max |logit| {largest_logit:.3g}", flush=True)


if __name__ == "__main__":
    main()
