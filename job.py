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
        sub_centers=cfg.sub_centers, easy_margin=cfg.easy_margin, image_size=cfg.crop,
    )
    if cfg.partial_fc:
        # The dense head is built first, so a sharded run starts where a dense one does.
        model.head = PartialFCHead.from_dense(model.head, cfg.partial_fc, cfg.seed)
    if cfg.pretrained:
        report = load_pretrained_backbone(model.backbone, cfg.arch, cfg.pretrained)
        if runtime.is_main_process():
            print(pretrained_summary(cfg.pretrained, report), flush=True)
    schedule = make_schedule(cfg, len(train_set))
    return TrainObjects(train_set, query_set, gallery_set, model, make_optimizer(cfg, model, schedule),
                        schedule)


def pretrained_summary(source: str, report: BackboneLoadReport) -> str:
    """One line saying what a pretrained backbone file gave: a silent partial load trains from
    random weights where keys did not match."""
    left_out = [f"{len(keys)} {what}" for what, keys in (("missing", report.missing_keys),
                ("unexpected", report.unexpected_keys), ("ignored (classifier, head)", report.ignored_keys),
                ("interpolated to the crop (ViT position embeddings)", report.resized_keys)) if keys]
    return f"pretrained: backbone weights from {source}" + (f"; keys {', '.join(left_out)}" if left_out else "")


def make_optimizer(cfg: Config, model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """SGD; the Trainer sets each step's learning rate from the schedule."""
    return torch.optim.SGD(model.parameters(), lr=schedule.base_lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
