"""Embeddings of a data set on every rank, gathered exactly, and retrieval metrics.

Under a process group each rank embeds its DistributedSampler share. The sampler pads the
index list by repeating indices so every rank gets the same number of items; embeddings are
therefore gathered together with their data-set indices and written back by index, so a padded
repeat never counts twice and the result is identical under any world size.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from arcface.metrics import retrieval_metrics
from arcface.rerank import Rerank, reranked_metrics
from support import runtime


class _WithIndex(Dataset):
    """Yields (image, index) for a data set of (image, label) pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _label = self.dataset[index]
        return image, index


def prepare_eval_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    persistent_workers: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A loader of (image, data-set index) batches: this rank's share when a process group exists.

    Build it after the process group, once per data set when evaluating repeatedly: with
    `persistent_workers` its worker processes start once instead of at every evaluation (under
    mp.spawn workers are spawned too, and a spawned worker takes seconds to start).
    """
    if batch_size < 1:
        raise ValueError(f"prepare_eval_loader: batch_size must be >= 1, got {batch_size}")
    indexed = _WithIndex(dataset)
    return DataLoader(
        indexed,
        batch_size=batch_size,
        sampler=DistributedSampler(indexed, shuffle=False) if runtime.is_distributed() else None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=worker_init_fn,
    )


def embed_loader(
    model: Callable[[Tensor], Tensor],
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> Tensor:
    """(len(data set), D) float32 CPU embeddings in data-set order, identical on every rank.

    `loader` comes from prepare_eval_loader. `model` maps a batch of images to embeddings (a
    module, or a bound method such as `model.embed`); its module is put in eval mode for the
    pass and restored afterwards.
    """
    if not isinstance(loader.dataset, _WithIndex):
        raise TypeError(
            "embed_loader: expected a loader made by prepare_eval_loader (batches carry data-set indices), "
            f"got one over {type(loader.dataset).__name__}"
        )
    if len(loader.dataset) == 0:
        raise ValueError("embed_loader: the data set is empty; expected at least one item")
    batches = tqdm(loader, desc="embedding", unit="batch", disable=not (progress and runtime.is_main_process()))
    embeddings, indices = _embed_batches(model, batches, device, autocast_dtype, channels_last)
    if runtime.is_distributed():
        embeddings = _all_gather(embeddings, device)
        indices = _all_gather(indices, device)
    return _place_by_index(embeddings.cpu(), indices.cpu(), len(loader.dataset))


def extract_embeddings(
    model: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> Tensor:
    """embed_loader over a one-off loader of `dataset`: for a single pass over a data set."""
    loader = prepare_eval_loader(dataset, batch_size, device, num_workers)
    return embed_loader(model, loader, device, autocast_dtype, channels_last, progress)


def evaluate_retrieval(
    model: Callable[[Tensor], Tensor],
    query_set: Dataset,
    gallery_set: Dataset,
    batch_size: int,
    device: torch.device,
    recall_at: Sequence[int] = (1,),
    map_at: Sequence[int] = (10,),
    ap_mode: str = "IR",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    rerank: Rerank | None = None,
) -> dict[str, float]:
    """evaluate_loaders over one-off loaders of both sets: for a single evaluation."""
    query_loader = prepare_eval_loader(query_set, batch_size, device, num_workers)
    gallery_loader = prepare_eval_loader(gallery_set, batch_size, device, num_workers)
    return evaluate_loaders(
        model, query_loader, gallery_loader, device, recall_at, map_at, ap_mode, autocast_dtype, channels_last,
        progress, rerank,
    )


def evaluate_loaders(
    model: Callable[[Tensor], Tensor],
    query_loader: DataLoader,
    gallery_loader: DataLoader,
    device: torch.device,
    recall_at: Sequence[int] = (1,),
    map_at: Sequence[int] = (10,),
    ap_mode: str = "IR",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    rerank: Rerank | None = None,
) -> dict[str, float]:
    """Embed both sets and return retrieval_metrics (query vs gallery); same dict on every rank.

    The loaders come from prepare_eval_loader. Labels come from `dataset.labels` when the data
    set has it, else from iterating the set. Pass the unwrapped model's embedding function, not
    the DDP wrapper: evaluation needs no gradient synchronisation. With `rerank`, the metrics of
    the re-ranked search (arcface.rerank), computed like the plain ones on the gathered embeddings.
    """
    def embed(loader: DataLoader) -> Tensor:
        return embed_loader(model, loader, device, autocast_dtype, channels_last, progress)

    query, gallery = embed(query_loader), embed(gallery_loader)
    for name, embeddings in (("query", query), ("gallery", gallery)):
        if not torch.isfinite(embeddings).all():  # the same gathered embeddings: every rank raises
            bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
            raise NonFiniteEmbeddings(f"{bad} of {len(embeddings)} {name} embeddings hold NaN or infinite values")
    query_labels = dataset_labels(query_loader.dataset.dataset)
    gallery_labels = dataset_labels(gallery_loader.dataset.dataset)

    def compute() -> dict[str, float]:
        # Ranking runs on `device`: on a GPU the O(Q x G x D) similarity product is instant.
        if rerank is not None:
            return reranked_metrics(
                query.to(device), gallery.to(device), query_labels, gallery_labels, rerank,
                recall_at=tuple(recall_at), map_at=tuple(map_at), ap_mode=ap_mode,
            )
        return retrieval_metrics(
            query.to(device), gallery.to(device), query_labels, gallery_labels,
            recall_at=recall_at, map_at=map_at, ap_mode=ap_mode,
        )

    # Every rank holds the same embeddings, but the ranking costs O(Q x G x D) (In-Shop:
    # ~0.7 TFLOP). Doing it once on rank 0 and broadcasting the small dict keeps the other ranks
    # off the node's shared CPU cores and memory and guarantees identical numbers everywhere; a
    # failure there reaches every rank instead of leaving them waiting.
    return runtime.one_rank_decides(compute, Exception, device)


class NonFiniteEmbeddings(ValueError):
    """Embeddings with NaN or infinite values: the model has diverged (or its input is degenerate)."""


def dataset_labels(dataset: Dataset) -> Tensor:
    """(len(dataset),) labels: `dataset.labels` when present, else the label of every item."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        # Loads every item once more; data sets used for evaluation should expose `labels`.
        labels = [int(dataset[index][1]) for index in range(len(dataset))]
    labels = torch.as_tensor(labels)
    if labels.shape != (len(dataset),):
        raise ValueError(
            f"{type(dataset).__name__}.labels must have shape ({len(dataset)},) (one label per "
            f"item), got {tuple(labels.shape)}"
        )
    return labels


def _embed_batches(
    model: Callable[[Tensor], Tensor],
    batches: Iterator[tuple[Tensor, Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[Tensor, Tensor]:
    """(n, D) float32 embeddings on `device` and the (n,) data-set indices they belong to."""
    embeddings, indices = [], []
    with _eval_mode(_owning_module(model)), torch.inference_mode():
        for images, batch_indices in batches:
            images = images.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast_dtype):
                batch_embeddings = model(images)
            if batch_embeddings.dim() != 2 or batch_embeddings.shape[0] != images.shape[0]:
                raise ValueError(
                    f"extract_embeddings: the model must return ({images.shape[0]}, D) for a batch "
                    f"of {images.shape[0]} images, got {tuple(batch_embeddings.shape)}"
                )
            embeddings.append(batch_embeddings.float())
            indices.append(batch_indices)
    # Concatenated outside inference mode, so callers get ordinary tensors they may modify.
    return torch.cat(embeddings), torch.cat(indices)


def _place_by_index(embeddings: Tensor, indices: Tensor, size: int) -> Tensor:
    """(size, D) tensor with row i the embedding of item i; repeated indices keep their first copy."""
    sorted_indices, order = torch.sort(indices, stable=True)
    first_copy = torch.ones_like(sorted_indices, dtype=torch.bool)
    first_copy[1:] = sorted_indices[1:] != sorted_indices[:-1]
    if not torch.equal(sorted_indices[first_copy], torch.arange(size)):
        raise RuntimeError(
            f"extract_embeddings: gathered indices cover {int(first_copy.sum())} distinct items, "
            f"expected exactly the {size} items 0..{size - 1}"
        )
    keep = order[first_copy]
    placed = torch.empty(size, embeddings.shape[1], dtype=torch.float32)
    placed[indices[keep]] = embeddings[keep]
    return placed


def _all_gather(tensor: Tensor, device: torch.device) -> Tensor:
    """Concatenation, in rank order, of every rank's equally shaped `tensor`."""
    local = tensor.to(_collective_device(device)).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def _collective_device(device: torch.device) -> torch.device:
    # nccl only moves CUDA tensors; gloo (the CPU backend) wants CPU tensors.
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _owning_module(model: Callable[[Tensor], Tensor]) -> nn.Module | None:
    """The module behind `model`: itself, or the owner of a bound method like `module.embed`."""
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


@contextlib.contextmanager
def _eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets its own previous mode back."""
    if module is None:
        yield
        return
    previous_modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, was_training in previous_modes:
            submodule.training = was_training


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

