"""Use a trained model from Python: embed images, search a gallery.

    from tools.api import load_retriever

    retriever = load_retriever("runs/demo/snapshot.pt")          # or an export of tools/export.py
    vectors = retriever.embed(["a.jpg", "b.jpg"])                # (2, D), L2-normalised
    for match in retriever.search("query.jpg", "shop_photos/", k=5)[0]:
        print(match.rank, f"{match.score:.3f}", match.path)
    retriever.search(["q1.jpg", "q2.jpg"], index="runs/demo/catalog", k=10)  # a catalog of tools/embed.py

A model is anything `tools/common.load_model` reads: a training snapshot or a TorchScript export
(for mmpretrain checkpoints use `tools.common.load_mmpretrain` and pass the result to
`Retriever`). Images are preprocessed with the pipeline the model was trained and evaluated with
(sizes, normalisation and resize interpolation as the snapshot or export records them). Searching
the same gallery again reuses its embeddings (kept in memory, keyed by the gallery's paths).
`index=OUT` searches a catalog folder of tools/embed.py instead: through its FAISS index when
tools/index.py built one, exactly otherwise; a catalog of another model's embeddings is refused.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from support import runtime
from arcface.retrieval import extract_embeddings
from arcface.transforms import MAX_IMAGE_PIXELS
from tools.catalog import (INDEX_INFO_FILE, META_FILE, Catalog, CatalogIndex, exact_search, open_searcher,
                           read_catalog, search_index)
from tools.common import ImageFiles, LoadedModel, list_images, load_model
from tools.embed import catalog_items, catalog_paths, check_catalog_dim, check_catalog_model

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
        self._catalog: tuple[tuple[str, int, int], _OpenCatalog] | None = None

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

    def search(self, queries: ImagePaths, gallery: ImagePaths | None = None, k: int = 5, *,
               index: str | os.PathLike | None = None) -> list[list[Match]]:
        """The k best gallery images for each query, best first (one list per query image).

        `gallery` is a folder, an In-Shop root (its gallery split), or a list of image paths; or
        `index` is a catalog folder of tools/embed.py (one of the two).
        """
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k}")
        if (gallery is None) == (index is None):
            raise ValueError("search: give gallery= (images embedded here) or index= (a catalog folder of "
                             "tools/embed.py), one of the two")
        vectors = self.embed(queries)
        if index is not None:
            opened = self._open_catalog(Path(index))
            check_catalog_dim(opened.catalog, vectors.shape[1])
            scores, rows = search_index(opened.searcher, vectors, k)
            return _matches(scores, rows, opened.paths, opened.items)
        gallery_paths, gallery_vectors, items = self._gallery_embeddings(gallery)
        scores, rows = exact_search(gallery_vectors.numpy(), vectors.numpy(), k)
        return _matches(scores, rows, list(gallery_paths), items)

    def _open_catalog(self, path: Path) -> _OpenCatalog:
        """The catalog (and its index), kept open while its meta.json and index.json are unchanged."""
        key = (str(path.resolve()), _mtime(path / META_FILE), _mtime(path / INDEX_INFO_FILE))
        if self._catalog is None or self._catalog[0] != key:
            catalog = read_catalog(path)
            check_catalog_model(catalog, self.model)
            self._catalog = (key, _OpenCatalog(catalog, open_searcher(catalog), catalog_paths(catalog),
                                               catalog_items(catalog)))
        return self._catalog[1]

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


@dataclass(frozen=True)
class _OpenCatalog:
    catalog: Catalog
    searcher: Catalog | CatalogIndex
    paths: list[str]  # absolute
    items: list[str | None] | None


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else -1


def _matches(scores: np.ndarray, rows: np.ndarray, paths: list[str],
             items: list[str | None] | None) -> list[list[Match]]:
    """Match lists from (Q, k) scores and rows; places an approximate index left empty (row -1) are left out."""
    results = []
    for row_scores, row_rows in zip(scores.tolist(), rows.tolist()):
        found = [(score, row) for score, row in zip(row_scores, row_rows) if row >= 0]
        results.append([Match(rank, score, paths[row], items[row] if items else None)
                        for rank, (score, row) in enumerate(found, start=1)])
    return results


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
