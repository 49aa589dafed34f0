"""Data sets, model, optimizer and schedule for the training job (`load_train_objs`), and loaders.

The names follow the PyTorch DDP tutorial (`MyTrainDataset`, `load_train_objs`,
`prepare_dataloader`); what they build is the ArcFace retrieval job.
"""

from __future__ import annotations

import fcntl
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import distributed
from arcface.inshop import InShop
from arcface.model import RetrievalModel, build_model
from arcface.synthetic import GENERATOR_VERSION, generate_inshop
from arcface.transforms import test_transform, train_transform
from config import Config


class MyTrainDataset(Dataset):
    """The tutorial's toy set, made learnable: Gaussian clusters, one per class, in `in_features` dims.

    (The tutorial's version pairs random inputs with a one-column target, so its model never learns.)
    """

    def __init__(self, size: int, in_features: int = 20, num_classes: int = 4, seed: int = 0,
                 split: int = 0):
        centres = 3.0 * torch.randn(num_classes, in_features, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed * 7919 + split + 1)  # another split: other samples, same classes
        self.labels = torch.randint(num_classes, (size,), generator=g)
        self.data = centres[self.labels] + torch.randn(size, in_features, generator=g)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.labels[index]


@dataclass
class TrainObjects:
    train_set: Dataset
    query_set: Dataset
    gallery_set: Dataset
    model: RetrievalModel
    optimizer: torch.optim.Optimizer
    lr_schedule: np.ndarray  # learning rate of every optimizer step of the run
    steps_per_epoch: int  # optimizer steps


def load_train_objs(cfg: Config) -> TrainObjects:
    """Everything the Trainer needs. Call after the process group exists: lr scales with world size."""
    root = Path(cfg.data_root) if cfg.data_root else synthetic_root(cfg)
    train_set = InShop(root, "train", transform=train_transform(cfg.resize, cfg.crop))
    query_set = InShop(root, "query", transform=test_transform(cfg.resize, cfg.crop))
    gallery_set = InShop(root, "gallery", transform=test_transform(cfg.resize, cfg.crop))
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights, so a run can be repeated
    model = build_model(
        num_classes=train_set.num_classes, arch=cfg.arch, pretrained=cfg.pretrained or None,
        pooling=cfg.pooling, embedding_dim=cfg.embedding_dim or None, scale=cfg.scale,
        margin=cfg.margin_file or cfg.margin, sub_centers=cfg.sub_centers, easy_margin=cfg.easy_margin,
    )
    optimizer, schedule, steps = make_optimizer(cfg, model, len(train_set))
    return TrainObjects(train_set, query_set, gallery_set, model, optimizer, schedule, steps)


def make_optimizer(cfg: Config, model: nn.Module, num_train: int) -> tuple[torch.optim.Optimizer, np.ndarray, int]:
    """SGD and its per-step learning rates for this world size: (optimizer, lr_schedule, steps_per_epoch)."""
    world = distributed.world_size()
    steps = steps_per_epoch(num_train, world, cfg.batch_size, cfg.grad_accum_steps)
    if steps == 0:
        raise ValueError(
            f"batch_size: {num_train} training images are too few for batch_size {cfg.batch_size} "
            f"x {world} processes x grad_accum_steps {cfg.grad_accum_steps}"
        )
    # Linear scaling rule: lr is given for a total batch of lr_batch_size images.
    base_lr = cfg.lr * cfg.batch_size * world * cfg.grad_accum_steps / cfg.lr_batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    schedule = lr_schedule(base_lr, cfg.total_epochs, steps, cfg.warmup_epochs, cfg.warmup_factor, cfg.min_lr)
    return optimizer, schedule, steps


def synthetic_root(cfg: Config) -> Path:
    """The demo set, generated once per setting and generator version.

    generate_inshop alone is already safe when several processes call it at once (it builds in a
    staging folder and renames); the file lock only spares the other ranks from drawing the same
    images in parallel while one of them does.
    """
    root = Path(cfg.synthetic_dir) / (
        f"v{GENERATOR_VERSION}_items{cfg.synthetic_items}_views{cfg.synthetic_views}"
        f"_size{cfg.synthetic_size}_seed{cfg.synthetic_seed}"
    )
    partition = root / "Eval" / "list_eval_partition.txt"
    if partition.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not partition.exists():
            if distributed.local_rank() == 0:
                print(f"generating the synthetic In-Shop set in {root} ...", flush=True)
            generate_inshop(root, items=cfg.synthetic_items, views=cfg.synthetic_views,
                            size=cfg.synthetic_size, seed=cfg.synthetic_seed)
    return root


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, grad_accum_steps: int = 1) -> int:
    """Optimizer steps per epoch: each process sees ceil(N / world) samples in full batches only."""
    batches = math.ceil(num_samples / world_size) // batch_size
    return batches // grad_accum_steps


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


class EpochSampler(DistributedSampler):
    """A DistributedSampler that also serves a single process, resumes mid-epoch, and seeds samples.

    It yields `(index, sample_seed)` pairs; `SeededDataset` seeds each sample's augmentation with
    them. A sample's crop and flip then depend only on (seed, epoch, index), not on the number of
    loader workers or processes, so a resumed run sees exactly the images an uninterrupted one would.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.start = 0  # samples of this rank to skip in the current epoch (mid-epoch resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        return iter([(i, (base + i) % (2**63)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Runs the wrapped data set's random transforms under a per-sample seed from EpochSampler."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator drives the transforms; torch.manual_seed would also seed
            # (and, where uninitialised, queue work for) every accelerator: ~0.2 ms per sample.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                       pin_memory: bool | None = None) -> DataLoader:
    """A training loader: this process's shard of every epoch (DistributedSampler-style), full batches.

    pin_memory defaults to "when CUDA is there": page-locked batches copy to the GPU asynchronously.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    sampler = EpochSampler(dataset, distributed.world_size(), distributed.global_rank(), seed=seed)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,  # BatchNorm and the margin loss want full batches
        persistent_workers=num_workers > 0,
        worker_init_fn=distributed.ignore_stop_signals,
    )
