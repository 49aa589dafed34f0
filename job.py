"""The training job: data sets, model, optimizer and the schedule of optimizer steps.

`load_train_objs` is the tutorial's name for "everything the Trainer needs". The `Schedule` it
returns (support/schedule.py) is the one place where the sizes derived from the configuration and
the world size live (steps per epoch, micro-batches per step, the learning rate of every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from arcface.model import (
    BackboneLoadReport,
    RetrievalModel,
    build_model,
    load_pretrained_backbone,
)
from arcface.param_groups import describe, param_groups
from arcface.partial_fc import PartialFCHead
from datautils import load_datasets
from support import runtime
from support.config import Config
from support.schedule import Schedule, make_schedule


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
        sub_centers=cfg.sub_centers, easy_margin=cfg.easy_margin, image_size=cfg.crop, drop_path=cfg.drop_path,
    )
    if cfg.partial_fc:
        # The dense head is built first, so a sharded run starts where a dense one does.
        model.head = PartialFCHead.from_dense(model.head, cfg.partial_fc, cfg.seed)
    if cfg.pretrained:
        report = load_pretrained_backbone(model.backbone, cfg.arch, cfg.pretrained)
        if runtime.is_main_process():
            print(pretrained_summary(cfg.pretrained, report), flush=True)
    schedule = make_schedule(cfg, len(train_set))
    optimizer = make_optimizer(cfg, model, schedule)
    if runtime.is_main_process() and len(optimizer.param_groups) > 1:
        print(optimizer_summary(cfg, optimizer, schedule), flush=True)
    return TrainObjects(train_set, query_set, gallery_set, model, optimizer, schedule)


def pretrained_summary(source: str, report: BackboneLoadReport) -> str:
    """One line saying what a pretrained backbone file gave: a silent partial load trains from
    random weights where keys did not match."""
    left_out = [f"{len(keys)} {what}" for what, keys in (("missing", report.missing_keys),
                ("unexpected", report.unexpected_keys), ("ignored (classifier, head)", report.ignored_keys),
                ("interpolated to the crop (ViT position embeddings)", report.resized_keys)) if keys]
    return f"pretrained: backbone weights from {source}" + (f"; keys {', '.join(left_out)}" if left_out else "")


def make_optimizer(cfg: Config, model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW (adam_beta1/2, adam_eps; decoupled weight decay) over the
    parameter groups of arcface/param_groups.py.

    Each parameter group carries its weight decay and an `lr_scale`; the Trainer sets a group's
    learning rate to `schedule.lr[step] x lr_scale` every step:
      - weight decay: cfg.weight_decay, or 0 for biases, norm weights, other 1-d parameters,
        position embeddings and class tokens when decay_norm_and_bias is false;
      - lr_scale: head_lr_mult for the ArcFace head (`head.*`, also a Partial FC shard); with
        layer_decay d < 1, d^(L+1) for the trunk's stem, d^(L+1-i) for its block i of L and 1
        for what follows the blocks; 1 for everything else.
    The defaults (decay on everything, d = 1, head_lr_mult = 1) give one group of all parameters
    with lr_scale 1: the plain optimizer of the reference recipe, step for step.
    """
    groups = param_groups(model, cfg.weight_decay, decay_norm_and_bias=cfg.decay_norm_and_bias,
                          layer_decay=cfg.layer_decay, head_lr_mult=cfg.head_lr_mult)
    for group in groups:
        group["lr"] = schedule.base_lr * group["lr_scale"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=schedule.base_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=schedule.base_lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


def optimizer_summary(cfg: Config, optimizer: torch.optim.Optimizer, schedule: Schedule) -> str:
    """One line: the optimizer, its groups' range of peak learning rates and who decays."""
    rows = describe(optimizer.param_groups, schedule.base_lr)
    lrs = [lr for _, _, lr in rows]
    decayed = sum(count for count, decay, _ in rows if decay)
    spared = sum(count for count, decay, _ in rows if not decay)
    return (f"optimizer: {cfg.optimizer}, {len(rows)} parameter groups, peak lr {min(lrs):.3g} to {max(lrs):.3g}; "
            f"weight decay {cfg.weight_decay:g} on {decayed} tensors, none on {spared}")
