"""The job's data: its data sets (In-Shop or the generated demo set) and the training loader.

`prepare_dataloader` keeps the PyTorch DDP tutorial's name; its sampler shards every epoch over
the processes, resumes in the middle of one, and seeds each sample's augmentation.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import runtime
from arcface.inshop import InShop
from arcface.synthetic import GENERATOR_VERSION, generate_inshop
from arcface.transforms import test_transform, train_transform
from config import Config


def load_datasets(cfg: Config) -> tuple[InShop, InShop, InShop]:
    """The train, query and gallery sets of cfg.data_root, or of the synthetic demo set."""
    root = Path(cfg.data_root) if cfg.data_root else synthetic_root(cfg)
    return (InShop(root, "train", transform=train_transform(cfg.resize, cfg.crop)),
            InShop(root, "query", transform=test_transform(cfg.resize, cfg.crop)),
            InShop(root, "gallery", transform=test_transform(cfg.resize, cfg.crop)))


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
            # (and, where uninitialised, queue work for) every accelerator, for every sample.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                       pin_memory: bool | None = None) -> DataLoader:
    """A training loader: this process's shard of every epoch (DistributedSampler-style), full batches.

    pin_memory defaults to "when CUDA is there": page-locked batches copy to the GPU asynchronously.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    sampler = EpochSampler(dataset, runtime.world_size(), runtime.global_rank(), seed=seed)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,  # BatchNorm and the margin loss want full batches
        persistent_workers=num_workers > 0,
        worker_init_fn=runtime.stop_signal_safe_workers(),
    )
