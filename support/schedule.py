"""The run's optimizer steps: images per step and how they are split, and every step's learning rate.

`make_schedule` derives them once from the configuration and the world size; the sampler, the
Trainer, the snapshots and the plots read them from the `Schedule` instead of deriving them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from support import runtime
from support.config import Config, ConfigError


@dataclass(frozen=True, eq=False)
class Schedule:
    """The optimizer steps of a run: how each step's batch is split, and each step's learning rate."""

    batch_size: int  # images per process and micro-batch
    world_size: int  # processes
    grad_accum_steps: int  # micro-batches per process and optimizer step
    steps_per_epoch: int  # optimizer steps
    base_lr: float  # the configured lr scaled to the global batch
    lr: np.ndarray  # learning rate of every optimizer step of the run

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum_steps

    @property
    def total_epochs(self) -> int:
        return len(self.lr) // self.steps_per_epoch


def make_schedule(cfg: Config, num_train: int, world_size: int | None = None) -> Schedule:
    """The run's optimizer steps for `world_size` processes (default: the process group's).

    With global_batch_size set, the micro-batches per step are derived from it, so the steps, their
    samples and the learning rates do not depend on the number of processes.
    """
    world = runtime.world_size() if world_size is None else world_size
    accum = cfg.grad_accum_steps
    if cfg.global_batch_size:
        per_round = cfg.batch_size * world
        if cfg.global_batch_size % per_round:
            raise ConfigError(
                f"global_batch_size: {cfg.global_batch_size} is not a multiple of batch_size "
                f"{cfg.batch_size} x {world} processes = {per_round}; give a batch_size whose product "
                f"with {world} divides {cfg.global_batch_size}")
        accum = cfg.global_batch_size // per_round
    global_batch = cfg.batch_size * world * accum
    steps = steps_per_epoch(num_train, global_batch)
    if steps == 0:
        raise ConfigError(
            f"batch_size: {num_train} training images are too few for one step of {global_batch} "
            f"(batch_size {cfg.batch_size} x {world} processes x {accum} micro-batches)"
        )
    # Linear scaling rule: lr is given for a total batch of lr_batch_size images.
    base_lr = cfg.lr * global_batch / cfg.lr_batch_size
    lrs = lr_schedule(base_lr, cfg.total_epochs, steps, cfg.warmup_epochs, cfg.warmup_factor, cfg.min_lr)
    return Schedule(cfg.batch_size, world, accum, steps, base_lr, lrs)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps per epoch: whole steps only (EpochSampler leaves the rest of the epoch out)."""
    return num_samples // global_batch


def lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                warmup_factor: float, min_lr: float = 0.0) -> np.ndarray:
    """Per-step learning rates: linear warm-up from warmup_factor * lr, then cosine to min_lr.

    Precomputed as an array (as DINO does) so it can be plotted and tested, and so resuming needs
    nothing but the step number.
    """
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total)
    ramp = base_lr * (warmup_factor + (1.0 - warmup_factor) * np.arange(warmup) / max(warmup, 1))
    t = np.arange(total - warmup) / max(total - warmup, 1)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + np.cos(np.pi * t))
    return np.concatenate([ramp, cosine])
