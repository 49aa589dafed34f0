"""Image search: embed a gallery once into an index file, then find the nearest gallery images.

    python tools/search.py runs/demo/snapshot.pt --query photo.jpg
    python tools/search.py runs/demo/snapshot.pt --gallery my_photos/ --query queries/ --top_k 5 \\
        --json results.json
    python tools/search.py --mmpretrain inshop_r50.pth --arch resnet50 --num_classes 3997 \\
        --gallery data/inshop --query data/inshop --max_queries 8 --json results.json
    python tools/search.py runs/demo/snapshot.pt --query queries/ --rerank qe     # re-ranked

The gallery is an In-Shop root (its --gallery_split, default gallery; item ids are kept), any
folder of images (searched recursively), or one image; by default, the gallery split of the data
the snapshot was trained on. Queries are an image, a folder, or an In-Shop root (its
--query_split). The index (default: next to the model, `<model>.index.pt`) holds L2-normalised
embeddings, paths, item ids, the model's fingerprint and the preprocessing. It is reused while
model and gallery are unchanged and rebuilt, with a message, when either differs. --rerank qe
or kr re-ranks the search (arcface/rerank.py) from the index's embeddings and the queries'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor

from support import runtime
from arcface.rerank import rerank_top_k
from arcface.retrieval import extract_embeddings
from arcface.transforms import MAX_IMAGE_PIXELS
from tools.common import (ImageFiles, ImageList, IndexMismatch, LoadedModel, add_max_pixels_arg,
                          add_model_args, add_rerank_args, atomic_output, check_max_pixels_arg,
                          check_rerank_args, default_data_root, list_images, metadata_of,
                          model_from_args, rerank_from_args, run_cli, write_json)

INDEX_FORMAT = "arcface-search-index"
INDEX_VERSION = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--query", required=True, help="an image, a folder of images, or an In-Shop root")
    parser.add_argument("--query_split", default="query", choices=("train", "query", "gallery"),
                        help="split used when --query is an In-Shop root")
    parser.add_argument("--max_queries", type=int, default=None,
                        help="at most this many queries, evenly spread over the list")
    parser.add_argument("--gallery", default=None,
                        help="an In-Shop root, a folder of images or one image; default: the training data")
    parser.add_argument("--gallery_split", default="gallery", choices=("train", "query", "gallery"))
    parser.add_argument("--index", default=None, help="index file; default: <model>.index.pt next to the model")
    parser.add_argument("--no_rebuild", action="store_true",
                        help="stop instead of rebuilding an index made by another model or gallery")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    add_max_pixels_arg(parser)
    add_rerank_args(parser)
    args = parser.parse_args(argv)
    for flag in ("top_k", "batch_size", "max_queries"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}: expected an integer >= 1, got {value}")
    check_max_pixels_arg(parser, args)
    check_rerank_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    model = model_from_args(args)
    model.module.to(device)
    gallery = list_images(args.gallery or default_data_root(model), args.gallery_split)
    index_path = Path(args.index) if args.index else default_index_path(args)
    index = load_or_build_index(index_path, model, gallery, device, args.batch_size, args.num_workers,
                                rebuild=not args.no_rebuild, max_pixels=args.max_image_pixels)
    queries = spread(list_images(args.query, args.query_split), args.max_queries)
    query_embeddings = embed_images(model, queries.paths, device, args.batch_size, args.num_workers,
                                    args.max_image_pixels)
    rerank = rerank_from_args(args)
    if rerank.method == "none":
        scores, ranked = top_k(query_embeddings, index["embeddings"], args.top_k)
    else:
        # Scores: cosine of the expanded vectors (qe), lambda cos + (1 - lambda) Jaccard similarity (kr).
        scores, ranked = rerank_top_k(query_embeddings, index["embeddings"], args.top_k, rerank)
        print(f"re-ranked: {', '.join(f'{key} {value}' for key, value in rerank.describe().items())}")
    results = collect_results(queries, index, scores, ranked)
    print(format_results(results))
    if args.json:
        reranked = {"rerank": rerank.describe()} if rerank.method != "none" else {}
        write_json({**metadata_of(model), "index": str(index_path), "top_k": ranked.shape[1], **reranked,
                    "results": results}, args.json)
        print(f"written to {args.json}")
    return 0


def default_index_path(args: argparse.Namespace) -> Path:
    model_file = Path(args.mmpretrain or args.model)
    return model_file.with_name(model_file.stem + ".index.pt")


# ------------------------------------------------------------------------------------------
# The index


def load_or_build_index(path: Path, model: LoadedModel, gallery: ImageList, device: torch.device,
                        batch_size: int = 64, num_workers: int = 0, rebuild: bool = True,
                        max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """The index at `path` if it matches model and gallery; else a new one, saved to `path`."""
    if path.exists():
        index = load_index(path)
        reason = index_mismatch(index, model, gallery)
        if reason is None:
            print(f"using the index {path} ({len(index['paths'])} images)")
            return index
        if not rebuild:
            raise IndexMismatch(f"{path}: {reason}; run without --no_rebuild to rebuild it")
        print(f"{path}: {reason}: rebuilding it")
    index = build_index(model, gallery, device, batch_size, num_workers, max_pixels)
    save_index(index, path)
    print(f"index of {len(gallery.paths)} images written to {path}")
    return index


def build_index(model: LoadedModel, gallery: ImageList, device: torch.device, batch_size: int = 64,
                num_workers: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "embeddings": embed_images(model, gallery.paths, device, batch_size, num_workers, max_pixels),
        "paths": gallery.paths,
        "items": gallery.items,
        "gallery": gallery.source,
        "fingerprint": model.fingerprint,
        "model": model.source,
        "preprocess": model.preprocess.as_dict(),
    }


def save_index(index: dict[str, Any], path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(index, tmp)


def load_index(path: Path) -> dict[str, Any]:
    """weights_only: an index holds tensors, strings and lists, and loading it can never run code."""
    try:
        index = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a search index ({type(error).__name__}: {error})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a search index of tools/search.py (no format {INDEX_FORMAT!r})")
    if index.get("format_version") != INDEX_VERSION:
        raise ValueError(f"{path}: index format version {index.get('format_version')!r}, expected {INDEX_VERSION}")
    return index


def index_mismatch(index: dict[str, Any], model: LoadedModel, gallery: ImageList) -> str | None:
    """Why the index cannot serve this model and gallery, or None when it can."""
    if index["fingerprint"] != model.fingerprint:
        return (f"built by another model (index fingerprint {index['fingerprint']}, "
                f"{index['model']}; this model {model.fingerprint}, {model.source})")
    if index["gallery"] != gallery.source:
        return f"built from another gallery ({index['gallery']}, now {gallery.source})"
    if index["paths"] != gallery.paths:
        return f"the gallery's images changed ({len(index['paths'])} indexed, {len(gallery.paths)} now)"
    return None


# ------------------------------------------------------------------------------------------
# Embedding and search


def embed_images(model: LoadedModel, paths: list[str], device: torch.device, batch_size: int = 64,
                 num_workers: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """(len(paths), D) L2-normalised float32 embeddings, with a progress bar."""
    images = ImageFiles(paths, model.preprocess.transform(), max_pixels)
    embeddings = extract_embeddings(model.module, images, batch_size, device, num_workers, progress=True)
    return F.normalize(embeddings, dim=1)


def top_k(queries: Tensor, gallery: Tensor, k: int, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine scores (Q, k') and gallery indices (Q, k'), best first; k' = min(k, G).

    Both inputs are L2-normalised; queries go in chunks so memory stays O(chunk_size x G).
    """
    k = min(k, gallery.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start:start + chunk_size] @ gallery.T  # (chunk, G)
        chunk_scores, chunk_indices = similarity.topk(k, dim=1)
        scores.append(chunk_scores)
        indices.append(chunk_indices)
    return torch.cat(scores), torch.cat(indices)


def spread(images: ImageList, limit: int | None) -> ImageList:
    """At most `limit` images, evenly spaced over the list (so several items are represented)."""
    if limit is None or limit >= len(images.paths):
        return images
    picks = torch.linspace(0, len(images.paths) - 1, limit).round().long().tolist()
    items = [images.items[i] for i in picks] if images.items is not None else None
    return ImageList([images.paths[i] for i in picks], items, images.source)


def collect_results(queries: ImageList, index: dict[str, Any], scores: Tensor,
                    ranked: Tensor) -> list[dict[str, Any]]:
    """One record per query: its path, item (or None) and its matches, best first."""
    results = []
    for row, query_path in enumerate(queries.paths):
        query_item = queries.items[row] if queries.items is not None else None
        matches = []
        for rank, (score, gallery_index) in enumerate(zip(scores[row].tolist(), ranked[row].tolist()), start=1):
            item = index["items"][gallery_index] if index["items"] is not None else None
            matches.append({"rank": rank, "path": index["paths"][gallery_index], "score": score, "item": item})
        results.append({"query": query_path, "item": query_item, "matches": matches})
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for number, result in enumerate(results, start=1):
        item = f"  (item {result['item']})" if result["item"] else ""
        lines.append(f"query {number}/{len(results)}: {result['query']}{item}")
        for match in result["matches"]:
            verdict = ""
            if result["item"] and match["item"]:
                verdict = "  same item" if match["item"] == result["item"] else "  other item"
            lines.append(f"  {match['rank']:>3}  {match['score']:.4f}  {match['path']}{verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main))
