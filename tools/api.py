"""Use a trained model from Python: embed images, search a gallery.

    from tools.api import load_retriever

    retriever = load_retriever("runs/demo/snapshot.pt")          # or an export of tools/export.py
    vectors = retriever.embed(["a.jpg", "b.jpg"])                # (2, D), L2-normalised
    for match in retriever.search("query.jpg", "shop_photos/", k=5)[0]:
        print(match.rank, f"{match.score:.3f}", match.path)

A model is anything `tools/common.load_model` reads: a training snapshot or a TorchScript export
(for mmpretrain checkpoints use `tools.common.load_mmpretrain` and pass the result to
`Retriever`). Images are preprocessed with the pipeline the model was trained and evaluated with
(sizes, normalisation and resize interpolation as the snapshot or export records them). Searching
the same gallery again reuses its embeddings (kept in memory, keyed by the gallery's paths).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from support import runtime
from arcface.retrieval import extract_embeddings
from arcface.transforms import MAX_IMAGE_PIXELS
from tools.common import ImageFiles, LoadedModel, list_images, load_model
from tools.search import top_k

ImagePaths = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class Match:
    rank: int  # 1 = best
    score: float  # cosine similarity
    path: str
    item: str | None  # the In-Shop item id when the gallery is an In-Shop root


class Retriever:
    def __init__(self, model: LoadedModel, device: str | torch.device = "auto", batch_size: int = 64,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.model = model
        self.device = runtime.pick_device(device) if isinstance(device, str) else device
        self.model.module.to(self.device)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._gallery: tuple[tuple[str, ...], Tensor, list[str] | None] | None = None

    @property
    def fingerprint(self) -> str:
        """Changes with the weights and the preprocessing: embeddings of two fingerprints do not mix."""
        return self.model.fingerprint

    def embed(self, images: ImagePaths) -> Tensor:
        """(N, D) L2-normalised float32 embeddings (on the CPU) of image files, in order.

        `images` is one path, a list of paths, or a folder (every image below it, sorted).
        """
        paths, _ = _paths(images)
        return self._embed(paths)

    def search(self, queries: ImagePaths, gallery: ImagePaths, k: int = 5) -> list[list[Match]]:
        """The k best gallery images for each query, best first (one list per query image).

        `gallery` is a folder, an In-Shop root (its gallery split), or a list of image paths.
        """
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k}")
        gallery_paths, gallery_vectors, items = self._gallery_embeddings(gallery)
        scores, indices = top_k(self.embed(queries), gallery_vectors, k)
        return [[Match(rank, float(score), gallery_paths[index], items[index] if items else None)
                 for rank, (score, index) in enumerate(zip(row_scores.tolist(), row_indices.tolist()), start=1)]
                for row_scores, row_indices in zip(scores, indices)]

    def _embed(self, paths: list[str]) -> Tensor:
        images = ImageFiles(paths, self.model.preprocess.transform(), self.max_pixels)
        embeddings = extract_embeddings(self.model.module, images, self.batch_size, self.device, progress=False)
        return F.normalize(embeddings, dim=1).cpu()

    def _gallery_embeddings(self, gallery: ImagePaths) -> tuple[tuple[str, ...], Tensor, list[str] | None]:
        paths, items = _paths(gallery)
        key = tuple(paths)
        if self._gallery is None or self._gallery[0] != key:
            self._gallery = (key, self._embed(paths), items)
        return self._gallery


def load_retriever(path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 64,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> Retriever:
    """A Retriever over a training snapshot or a TorchScript export of tools/export.py."""
    return Retriever(load_model(path), device, batch_size, max_pixels)


def _paths(images: ImagePaths) -> tuple[list[str], list[str] | None]:
    """Image paths (and In-Shop item ids where known) of a path, a folder, a root or a list."""
    if isinstance(images, (str, os.PathLike)):
        listed = list_images(images)
        return listed.paths, listed.items
    paths = [str(Path(p)) for p in images]
    if not paths:
        raise ValueError("expected at least one image path, got an empty list")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such image file"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths, None
