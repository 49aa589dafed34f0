"""extract_embeddings / evaluate_retrieval: local results, and exactness under world size 2."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from arcface.retrieval import (
    dataset_labels, embed_loader, evaluate_loaders, evaluate_retrieval, extract_embeddings, prepare_eval_loader,
)
from arcface.metrics import retrieval_metrics
from toy import spawn

CPU = torch.device("cpu")
# Odd sizes, so DistributedSampler pads both sets under world size 2.
NUM_QUERY, NUM_GALLERY = 7, 11


class TinyEmbedder(nn.Module):
    """Linear embedding with integer weights; dropout makes train mode visibly different.

    Images and weights hold small integers, so every sum is exact in float32 whatever the
    batch composition: embeddings from different batchings must match bit for bit.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(12, 5, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randint(-3, 4, (5, 12), generator=generator).float())
        self.dropout = nn.Dropout(p=0.5)
        self.images_seen = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        return self.dropout(self.linear(images.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)


class ImageSet(Dataset):
    """(image, label) pairs of small-integer 3x2x2 images; `labels` only when asked for."""

    def __init__(self, size: int, seed: int, expose_labels: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(-4, 5, (size, 3, 2, 2), generator=generator).float()
        self._labels = torch.arange(size) % 3
        if expose_labels:
            self.labels = self._labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self._labels[index])


def _query_and_gallery() -> tuple[ImageSet, ImageSet]:
    return ImageSet(NUM_QUERY, seed=1), ImageSet(NUM_GALLERY, seed=2)


def _direct_embeddings(model: TinyEmbedder, dataset: ImageSet) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.embed(dataset.images)


def test_extract_without_process_group_equals_direct_calls_and_restores_mode():
    model, (dataset, _) = TinyEmbedder(), _query_and_gallery()
    model.train()
    model.linear.eval()  # a mixed state must come back exactly as it was
    embeddings = extract_embeddings(model.embed, dataset, batch_size=3, device=CPU)
    assert model.training and not model.linear.training and model.dropout.training
    assert embeddings.dtype == torch.float32 and embeddings.device == CPU
    assert not embeddings.is_inference()
    # Equal to eval-mode calls: dropout in train mode would zero and rescale entries.
    assert torch.equal(embeddings, _direct_embeddings(model, dataset))


def test_extract_accepts_a_module_and_applies_autocast_and_channels_last():
    seen = {}

    class Recorder(TinyEmbedder):
        def embed(self, images: torch.Tensor) -> torch.Tensor:
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            seen["channels_last"] = images.is_contiguous(memory_format=torch.channels_last)
            output = super().embed(images)
            seen["dtype"] = output.dtype
            return output

    model, (dataset, _) = Recorder(), _query_and_gallery()
    embeddings = extract_embeddings(
        model, dataset, batch_size=4, device=CPU, autocast_dtype=torch.bfloat16, channels_last=True
    )
    assert seen == {"autocast": True, "channels_last": True, "dtype": torch.bfloat16}
    assert embeddings.dtype == torch.float32
    # Integers up to 12 * 4 * 3 = 144 are exact in bfloat16.
    assert torch.equal(embeddings, _direct_embeddings(model, dataset))


def test_evaluate_without_process_group_matches_metrics_of_direct_embeddings():
    model, (query_set, gallery_set) = TinyEmbedder(), _query_and_gallery()
    metrics = evaluate_retrieval(
        model.embed, query_set, gallery_set, batch_size=4, device=CPU, recall_at=(1, 3), map_at=(5,)
    )
    expected = retrieval_metrics(
        _direct_embeddings(model, query_set), _direct_embeddings(model, gallery_set),
        query_set.labels, gallery_set.labels, recall_at=(1, 3), map_at=(5,),
    )
    assert metrics == expected


def test_persistent_loaders_evaluate_repeatedly_like_one_off_loaders():
    model, (query_set, gallery_set) = TinyEmbedder(), _query_and_gallery()
    expected = evaluate_retrieval(model.embed, query_set, gallery_set, batch_size=4, device=CPU, recall_at=(1, 3))
    query_loader, gallery_loader = (
        prepare_eval_loader(data, 4, CPU, num_workers=1, persistent_workers=True) for data in (query_set, gallery_set)
    )
    first = evaluate_loaders(model.embed, query_loader, gallery_loader, CPU, recall_at=(1, 3))
    workers = query_loader._iterator._workers  # kept alive between passes
    second = evaluate_loaders(model.embed, query_loader, gallery_loader, CPU, recall_at=(1, 3))
    assert first == second == expected
    assert query_loader._iterator._workers == workers and all(worker.is_alive() for worker in workers)


def test_embed_loader_refuses_a_loader_without_indices():
    model, (dataset, _) = TinyEmbedder(), _query_and_gallery()
    plain = torch.utils.data.DataLoader(dataset, batch_size=4)
    with pytest.raises(TypeError, match="prepare_eval_loader.*ImageSet"):
        embed_loader(model.embed, plain, CPU)


def test_empty_set_and_bad_batch_size_are_refused():
    model = TinyEmbedder()
    with pytest.raises(ValueError, match="data set is empty"):
        extract_embeddings(model.embed, ImageSet(0, seed=1), batch_size=4, device=CPU)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        prepare_eval_loader(ImageSet(3, seed=1), 0, CPU)


def test_labels_come_from_iteration_when_the_set_has_no_labels_attribute():
    without_attribute = ImageSet(5, seed=3, expose_labels=False)
    assert not hasattr(without_attribute, "labels")
    assert torch.equal(dataset_labels(without_attribute), torch.tensor([0, 1, 2, 0, 1]))


def test_labels_of_the_wrong_length_are_rejected():
    dataset = ImageSet(5, seed=3)
    dataset.labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"ImageSet.labels must have shape \(5,\)"):
        dataset_labels(dataset)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model, (query_set, gallery_set) = TinyEmbedder(), _query_and_gallery()
        model.train()
        query = extract_embeddings(model.embed, query_set, batch_size=2, device=CPU)
        query_images_seen = model.images_seen
        gallery = extract_embeddings(model.embed, gallery_set, batch_size=2, device=CPU)
        metrics = evaluate_retrieval(
            model.embed, query_set, gallery_set, batch_size=2, device=CPU, recall_at=(1, 3), map_at=(5,)
        )
        # A failure while ranking on rank 0 must reach every rank instead of hanging them.
        unanswerable = ImageSet(NUM_QUERY, seed=1)
        unanswerable.labels = torch.full((NUM_QUERY,), 99)
        try:
            evaluate_retrieval(model.embed, unanswerable, gallery_set, batch_size=2, device=CPU)
            failure = ""
        except (ValueError, RuntimeError) as error:
            failure = str(error)
        result = dict(
            query=query, gallery=gallery, metrics=metrics, training=model.training,
            query_images_seen=query_images_seen, failure=failure,
        )
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_world_size_two_equals_world_size_one_on_odd_sizes(tmp_path: Path):
    model, (query_set, gallery_set) = TinyEmbedder(), _query_and_gallery()
    single_query = extract_embeddings(model.embed, query_set, batch_size=2, device=CPU)
    single_gallery = extract_embeddings(model.embed, gallery_set, batch_size=2, device=CPU)
    single_metrics = evaluate_retrieval(
        model.embed, query_set, gallery_set, batch_size=2, device=CPU, recall_at=(1, 3), map_at=(5,)
    )

    spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["query"], single_query), rank
        assert torch.equal(result["gallery"], single_gallery), rank
        assert result["metrics"] == single_metrics, rank
        assert result["training"] is True, rank
        # Each rank embedded only its padded share: ceil(7 / 2) = 4 query images.
        assert result["query_images_seen"] == 4, rank
        assert "no query has a relevant gallery item" in result["failure"], rank
