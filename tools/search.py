"""Image search: the nearest catalog images of each query (a catalog: a folder of tools/embed.py).

    python tools/search.py runs/demo/snapshot.pt --query photo.jpg --index runs/demo/catalog --top_k 5
    python tools/search.py runs/demo/snapshot.pt --query photo.jpg                # the training gallery
    python tools/search.py runs/demo/snapshot.pt --gallery my_photos/ --query queries/ --top_k 5 \\
        --json results.json
    python tools/search.py --mmpretrain inshop_r50.pth --arch resnet50 --num_classes 3997 \\
        --gallery data/inshop --query data/inshop --max_queries 8 --json results.json
    python tools/search.py runs/demo/snapshot.pt --query queries/ --rerank qe     # re-ranked

--index OUT searches a catalog folder written by tools/embed.py: through its FAISS index when
tools/index.py built one, exactly otherwise. Without --index the gallery (an In-Shop root's
--gallery_split, default gallery; any folder of images, searched recursively; one image; by
default the gallery split of the data the snapshot was trained on) is embedded by tools/embed.py's
code into a catalog folder next to the model, `<model>.catalog/`, reused while model and gallery
are unchanged and rebuilt, with a message, when either differs (--no_rebuild stops instead).
A catalog of another model's embeddings is refused. Queries are an image, a folder, or an
In-Shop root (its --query_split). --rerank qe or kr re-ranks the search (arcface/rerank.py) from
the catalog's embeddings and the queries'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from support import runtime
from arcface.rerank import rerank_top_k
from arcface.retrieval import extract_embeddings
from arcface.transforms import MAX_IMAGE_PIXELS
from tools.catalog import META_FILE, Catalog, CatalogIndex, IndexMismatch, open_searcher, read_catalog, search_index
from tools.common import (ImageFiles, ImageList, LoadedModel, add_max_pixels_arg, add_model_args, add_rerank_args,
                          check_max_pixels_arg, check_rerank_args, default_data_root, is_inshop_root, list_images,
                          metadata_of, model_from_args, rerank_from_args, run_cli, write_json)
from tools.embed import (CatalogImages, catalog_identity, catalog_items, catalog_paths, check_catalog_dim,
                         check_catalog_model, embed_catalog, existing_mismatch, list_catalog_images, remove_catalog)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--query", required=True, help="an image, a folder of images, or an In-Shop root")
    parser.add_argument("--query_split", default="query", choices=("train", "query", "gallery"),
                        help="split used when --query is an In-Shop root")
    parser.add_argument("--max_queries", type=int, default=None,
                        help="at most this many queries, evenly spread over the list")
    parser.add_argument("--index", default=None, metavar="OUT",
                        help="a catalog folder of tools/embed.py to search (with its FAISS index when "
                             "tools/index.py built one)")
    parser.add_argument("--gallery", default=None,
                        help="without --index: an In-Shop root, a folder of images or one image, embedded "
                             "into <model>.catalog/; default: the training data")
    parser.add_argument("--gallery_split", default="gallery", choices=("train", "query", "gallery"))
    parser.add_argument("--no_rebuild", action="store_true",
                        help="stop instead of rebuilding <model>.catalog/ made by another model or gallery")
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
    if args.index is not None and args.gallery is not None:
        parser.error("give --index OUT (a catalog of tools/embed.py) or --gallery (embedded here), not both")
    check_max_pixels_arg(parser, args)
    check_rerank_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    model = model_from_args(args)
    model.module.to(device)
    catalog = open_catalog(args, model, device)
    searcher = open_searcher(catalog)
    queries = spread(list_images(args.query, args.query_split), args.max_queries)
    query_embeddings = embed_images(model, queries.paths, device, args.batch_size, args.num_workers,
                                    args.max_image_pixels)
    check_catalog_dim(catalog, query_embeddings.shape[1])
    rerank = rerank_from_args(args)
    if rerank.method == "none":
        scores, ranked = search_catalog(searcher, query_embeddings, args.top_k)
    else:
        # Re-ranking needs every gallery vector: the catalog's embeddings, not its index.
        # Scores: cosine of the expanded vectors (qe), lambda cos + (1 - lambda) Jaccard similarity (kr).
        gallery = torch.from_numpy(np.asarray(catalog.embeddings, dtype=np.float32))
        scores, ranked = rerank_top_k(query_embeddings, gallery, args.top_k, rerank)
        print(f"re-ranked: {', '.join(f'{key} {value}' for key, value in rerank.describe().items())}")
    results = collect_results(queries, catalog_paths(catalog), catalog_items(catalog), scores, ranked)
    print(format_results(results))
    if args.json:
        reranked = {"rerank": rerank.describe()} if rerank.method != "none" else {}
        write_json({**metadata_of(model), "index": str(catalog.root), "searched": searched_with(searcher),
                    "top_k": ranked.shape[1], **reranked, "results": results}, args.json)
        print(f"written to {args.json}")
    return 0


def default_catalog_path(args: argparse.Namespace) -> Path:
    """<model>.catalog/ next to the model file (snapshot.pt -> snapshot.catalog/)."""
    model_file = Path(args.mmpretrain or args.model)
    return model_file.with_name(model_file.stem + ".catalog")


# ------------------------------------------------------------------------------------------
# The catalog


def open_catalog(args: argparse.Namespace, model: LoadedModel, device: torch.device) -> Catalog:
    """--index OUT, checked against the model; else the gallery's catalog in <model>.catalog/."""
    if args.index is not None:
        catalog = read_catalog(args.index)
        check_catalog_model(catalog, model)
        return catalog
    gallery = Path(args.gallery or default_data_root(model))
    split = args.gallery_split if gallery.is_dir() and is_inshop_root(gallery) else None
    return gallery_catalog(default_catalog_path(args), model, list_catalog_images(gallery, split), device,
                           args.batch_size, args.num_workers, rebuild=not args.no_rebuild,
                           max_pixels=args.max_image_pixels)


def gallery_catalog(out: Path, model: LoadedModel, gallery: CatalogImages, device: torch.device, batch_size: int = 64,
                    num_workers: int = 0, rebuild: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> Catalog:
    """The catalog at `out` if it holds this model's embeddings of `gallery`; else made anew there
    (tools/embed.py's code, on this process). Bad gallery images are skipped and listed in skipped.txt."""
    reason = existing_mismatch(out, catalog_identity(model, gallery, "float32", None, max_pixels))
    if reason is not None:
        if not rebuild:
            raise IndexMismatch(f"{out}: {reason}; run without --no_rebuild to rebuild it")
        print(f"{out}: {reason}: rebuilding it")
        remove_catalog(out)
    elif (out / META_FILE).is_file():
        catalog = read_catalog(out)
        print(f"using the catalog {out} ({catalog.count} images)")
        return catalog
    embed_catalog(model, gallery, out, device, batch_size=batch_size, num_workers=num_workers,
                  max_pixels=max_pixels)
    catalog = read_catalog(out)
    print(f"catalog of {catalog.count} images written to {out}")
    return catalog


def searched_with(searcher: Catalog | CatalogIndex) -> str:
    """"exact", or the kind of the FAISS index searched (flat, hnsw, ivfpq)."""
    return "exact" if isinstance(searcher, Catalog) else searcher.kind


def search_catalog(searcher: Catalog | CatalogIndex, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cosine scores (Q, k') and catalog rows (Q, k'), best first, through tools/catalog.py."""
    scores, rows = search_index(searcher, queries, k)
    return torch.from_numpy(scores), torch.from_numpy(rows)


# ------------------------------------------------------------------------------------------
# Embedding and search


def embed_images(model: LoadedModel, paths: list[str], device: torch.device, batch_size: int = 64,
                 num_workers: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """(len(paths), D) L2-normalised float32 embeddings, with a progress bar."""
    images = ImageFiles(paths, model.preprocess.transform(), max_pixels)
    embeddings = extract_embeddings(model.module, images, batch_size, device, num_workers, progress=True)
    return F.normalize(embeddings, dim=1)


def spread(images: ImageList, limit: int | None) -> ImageList:
    """At most `limit` images, evenly spaced over the list (so several items are represented)."""
    if limit is None or limit >= len(images.paths):
        return images
    picks = torch.linspace(0, len(images.paths) - 1, limit).round().long().tolist()
    items = [images.items[i] for i in picks] if images.items is not None else None
    return ImageList([images.paths[i] for i in picks], items, images.source)


def collect_results(queries: ImageList, paths: list[str], items: list[str | None] | None, scores: Tensor,
                    ranked: Tensor) -> list[dict[str, Any]]:
    """One record per query: its path, item (or None) and its matches, best first.

    An approximate index may find fewer than k rows for a query (row -1): those places are left out.
    """
    results = []
    for row, query_path in enumerate(queries.paths):
        query_item = queries.items[row] if queries.items is not None else None
        found = [(score, index) for score, index in zip(scores[row].tolist(), ranked[row].tolist()) if index >= 0]
        matches = [{"rank": rank, "path": paths[index], "score": score, "item": items[index] if items else None}
                   for rank, (score, index) in enumerate(found, start=1)]
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
