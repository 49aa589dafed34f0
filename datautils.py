"""The job's data: its data sets (In-Shop or the generated demo set) and the training loader.

`prepare_dataloader` keeps the PyTorch DDP tutorial's name; its sampler shards every step over
the processes the same way at any world size, resumes in the middle of an epoch, and seeds each
sample's augmentation.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from arcface.inshop import InShop
from arcface.model import preprocessing_for
from arcface.synthetic import GENERATOR_VERSION, generate_inshop
from arcface.transforms import test_transform, train_transform
from support import runtime
from support.config import Config
from support.schedule import Schedule


def load_datasets(cfg: Config) -> tuple[InShop, InShop, InShop]:
    """The train, query and gallery sets of cfg.data_root, or of the synthetic demo set, normalised
    and resized as the backbone's weights expect (`preprocessing_for(cfg.arch)`, which the snapshot
    records for the tools)."""
    root = Path(cfg.data_root) if cfg.data_root else synthetic_root(cfg)
    limit = cfg.max_image_pixels  # checked against each image's header before it is decoded
    preprocessing = preprocessing_for(cfg.arch).transform_kwargs()
    train = train_transform(cfg.resize, cfg.crop, **preprocessing)
    test = test_transform(cfg.resize, cfg.crop, **preprocessing)
    return (InShop(root, "train", transform=train, max_pixels=limit),
            InShop(root, "query", transform=test, max_pixels=limit),
            InShop(root, "gallery", transform=test, max_pixels=limit))


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
            # One process per node gets here; the others wait on the lock, then find the set.
            print(f"generating the synthetic In-Shop set in {root} ...", flush=True)
            generate_inshop(root, items=cfg.synthetic_items, views=cfg.synthetic_views,
                            size=cfg.synthetic_size, seed=cfg.synthetic_seed)
    return root


class EpochSampler(Sampler[tuple[int, int]]):
    """The job's order of samples, cut into optimizer steps and micro-batches; this process's share.

    Each epoch is one permutation of the data set (seeded by seed + epoch). Optimizer step `s`
    takes its next `global batch` samples, which form `world_size x grad_accum_steps` micro-batches
    of `batch_size` samples ("virtual ranks"): micro-batch `v` takes every V-th sample of the step,
    and process `r` computes micro-batches `a * world_size + r`, a = 0 .. grad_accum_steps - 1.
    Which samples a step holds and how they are grouped therefore depend on (seed, epoch, global
    batch, batch_size) only, not on how many processes share the work: 2 processes x 1 micro-batch
    and 1 process x 2 micro-batches compute the same gradients, and a run stopped after step `s`
    resumes there on any number of processes. (With one micro-batch per step this is exactly
    DistributedSampler's sharding.) The last samples of an epoch that fill no whole step are left out.

    It yields `(index, sample_seed)` pairs; `SeededDataset` seeds each sample's augmentation with
    them, so a sample's crop and flip depend only on (seed, epoch, index).
    """

    def __init__(self, num_samples: int, world_size: int, rank: int, batch_size: int,
                 grad_accum_steps: int = 1, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a job of {world_size} processes")
        self.num_samples = num_samples
        self.world_size, self.rank = world_size, rank
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.global_batch = batch_size * world_size * grad_accum_steps
        self.steps = num_samples // self.global_batch
        self.seed = seed
        self.epoch = 0
        self.start_step = 0  # steps of the current epoch already done (a mid-epoch resume)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        micro_batches = self.world_size * self.grad_accum_steps
        for step in range(self.start_step, self.steps):
            samples = order[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.grad_accum_steps):
                for index in samples[a * self.world_size + self.rank::micro_batches]:
                    yield index, (base + index) % (2**63)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum_steps * self.batch_size


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
            # (and, where uninitialised, queue work for) every accelerator, for every sample.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def prepare_dataloader(dataset: Dataset, schedule: Schedule, num_workers: int = 0, seed: int = 0,
                       pin_memory: bool | None = None) -> DataLoader:
    """A training loader: this process's micro-batches of every step of the schedule (EpochSampler).

    pin_memory defaults to "when CUDA is there": page-locked batches copy to the GPU asynchronously.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    sampler = EpochSampler(len(dataset), schedule.world_size, runtime.global_rank(), schedule.batch_size,
                           schedule.grad_accum_steps, seed=seed)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=schedule.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,  # BatchNorm and the margin loss want full batches
        persistent_workers=num_workers > 0,
        worker_init_fn=runtime.stop_signal_safe_workers(),
    )
