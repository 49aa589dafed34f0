"""A tiny retrieval job for Trainer tests: linear embedding + ArcFace head on Gaussian clusters, or
a tiny timm ViT on the same clusters seen as 8 x 8 images (for what needs a trunk with blocks)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from arcface.head import ArcFaceHead
from arcface.model import RetrievalModel
from datautils import prepare_dataloader
from job import make_optimizer
from support import runtime
from support.config import Config
from support.schedule import make_schedule
from trainer import Trainer


class MyTrainDataset(Dataset):
    """The DDP tutorial's toy set, made learnable: Gaussian clusters, one per class, in
    `in_features` dims. (The tutorial's version pairs random inputs with a one-column target, so
    its model never learns.)"""

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


IMAGE_SHAPE = (3, 8, 8)


class ToyImages(MyTrainDataset):
    """The clusters in 3 x 8 x 8 dimensions, each sample an RGB image of 8 x 8 pixels."""

    def __init__(self, size: int, num_classes: int = 4, seed: int = 0, split: int = 0):
        super().__init__(size, in_features=3 * 8 * 8, num_classes=num_classes, seed=seed, split=split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index].view(IMAGE_SHAPE), self.labels[index]


def toy_vit(num_classes: int = 4) -> RetrievalModel:
    """A timm VisionTransformer of 3 blocks on 8 x 8 images (4 patches) + ArcFace head: the model
    layout of a timm arch (`backbone.blocks.i`), small enough for multi-process tests."""
    from timm.models.vision_transformer import VisionTransformer

    trunk = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0,
                              num_classes=0)
    return RetrievalModel(trunk, nn.Identity(), nn.Identity(), ArcFaceHead(16, num_classes, scale=16.0, margin=0.2))


class ToyModel(nn.Module):
    def __init__(self, in_features: int = 20, dim: int = 8, num_classes: int = 4, batch_norm: bool = False):
        super().__init__()
        self.embedding = nn.Linear(in_features, dim)
        self.norm = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()
        self.head = ArcFaceHead(dim, num_classes, scale=16.0, margin=0.2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(x))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        features = self.embed(x)  # the Trainer's model contract: the embedding, or the batch's loss
        return features if labels is None else self.head.loss(features, labels, step)


def toy_config(out_dir: str, **changes) -> Config:
    values = dict(total_epochs=4, save_every=1, eval_every=2, out_dir=str(out_dir), device="cpu",
                  amp="off", num_workers=0, batch_size=8, eval_batch_size=16, log_every=1,
                  warmup_epochs=1.0, lr=0.5, lr_batch_size=8)
    values.update(changes)
    return Config(**values)


def toy_eval_sets(images: bool = False) -> tuple[MyTrainDataset, MyTrainDataset]:
    kind = ToyImages if images else MyTrainDataset
    return kind(15, seed=1, split=1), kind(21, seed=1, split=2)


def toy_trainer(cfg: Config, train_size: int = 64, batch_norm: bool = False, vit: bool = False) -> Trainer:
    """A Trainer of ToyModel on the clusters, or with vit=True of toy_vit on them as images."""
    torch.manual_seed(0)  # the same initial weights in every process and every run
    model = toy_vit() if vit else ToyModel(batch_norm=batch_norm)
    train_set = (ToyImages if vit else MyTrainDataset)(train_size, seed=1, split=0)
    query_set, gallery_set = toy_eval_sets(images=vit)
    schedule = make_schedule(cfg, len(train_set))
    loader = prepare_dataloader(train_set, schedule, cfg.num_workers, cfg.seed)
    return Trainer(cfg, model, loader, make_optimizer(cfg, model, schedule), schedule, query_set, gallery_set,
                   torch.device("cpu"))


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def spawn(worker, args: tuple = (), nprocs: int = 1, join: bool = True):
    """mp.spawn(worker, args, nprocs) whose processes end with runtime.exit_process, as the
    launcher's do: a worker that passed never fails in the interpreter's teardown."""
    return mp.spawn(_run_then_exit, args=(worker, args), nprocs=nprocs, join=join)


def _run_then_exit(rank: int, worker, args: tuple) -> None:
    try:
        worker(rank, *args)
    except BaseException:
        traceback.print_exc()
        runtime.exit_process(1)
    runtime.exit_process(0)
