"""The training job: data sets, model, optimizer and the schedule of optimizer steps.

`load_train_objs` is the tutorial's name for "everything the Trainer needs". The `Schedule` it
returns is the one place where the sizes derived from the configuration and the world size live
(steps per epoch, micro-batches per step, the learning rate of every step); the Trainer, the
sampler position and the snapshots read them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import runtime
from arcface.head import ArcFaceHead
from arcface.model import BackboneLoadReport, RetrievalModel, build_model, load_pretrained_backbone
from arcface.partial_fc import PartialFCHead
from config import Config, ConfigError
from datautils import load_datasets


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


@dataclass
class TrainObjects:
    train_set: Dataset
    query_set: Dataset
    gallery_set: Dataset
    model: RetrievalModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule


def load_train_objs(cfg: Config) -> TrainObjects:
    """Everything the Trainer needs. Call after the process group exists: the schedule depends on
    the world size."""
    train_set, query_set, gallery_set = load_datasets(cfg)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights, so a run can be repeated
    model = build_model(
        num_classes=train_set.num_classes, arch=cfg.arch, pooling=cfg.pooling,
        embedding_dim=cfg.embedding_dim or None, scale=cfg.scale, margin=cfg.margin_file or cfg.margin,
        sub_centers=cfg.sub_centers, easy_margin=cfg.easy_margin, image_size=cfg.crop,
    )
    if cfg.partial_fc:
        model.head = shard_head(model.head, cfg.partial_fc, cfg.seed)
    if cfg.pretrained:
        report = load_pretrained_backbone(model.backbone, cfg.arch, cfg.pretrained)
        if runtime.is_main_process():
            print(pretrained_summary(cfg.pretrained, report), flush=True)
    schedule = make_schedule(cfg, len(train_set))
    return TrainObjects(train_set, query_set, gallery_set, model, make_optimizer(cfg, model, schedule),
                        schedule)


def shard_head(head: ArcFaceHead, sample_rate: float, seed: int = 0) -> PartialFCHead:
    """This process's Partial FC shard of `head`: its rows, margins and settings (so a sharded run
    starts where the dense one does). The dense head is built first: arcface/partial_fc.py says
    how far that goes."""
    sharded = PartialFCHead(head.in_features, head.num_classes, head.scale, head.margin.tolist(),
                            head.sub_centers, head.easy_margin, sample_rate=sample_rate, seed=seed,
                            init="sharded")  # the rows are overwritten: no second dense draw
    sharded.load_dense(head.weight.detach())
    return sharded


def pretrained_summary(source: str, report: BackboneLoadReport) -> str:
    """One line saying what a pretrained backbone file gave: a silent partial load trains from
    random weights where keys did not match."""
    left_out = [f"{len(keys)} {what}" for what, keys in (("missing", report.missing_keys),
                ("unexpected", report.unexpected_keys), ("ignored (classifier, head)", report.ignored_keys),
                ("interpolated to the crop (ViT position embeddings)", report.resized_keys)) if keys]
    return f"pretrained: backbone weights from {source}" + (f"; keys {', '.join(left_out)}" if left_out else "")


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


def make_optimizer(cfg: Config, model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """SGD; the Trainer sets each step's learning rate from the schedule."""
    return torch.optim.SGD(model.parameters(), lr=schedule.base_lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


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
