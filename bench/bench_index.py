"""Build time, size, recall@10 and single-thread query time of each index kind (tools/catalog.py).

    python bench/bench_index.py [--n 1000000] [--dim 512] [--queries 1000] [--kinds flat,hnsw,ivfpq] [--seed 0]
    python bench/bench_index.py --n 200000 --kinds hnsw --sweep          # recall and time per ef_search

The rows are synthetic unit vectors clustered like a trained model's embeddings of a product
catalog: n / 100 items, each row its item's centre plus a variation of norm 0.6 in a
32-dimensional subspace shared by all items (pose, light, background: what moves one item's
images) and an isotropic noise of norm 0.3, L2-normalised, so rows of one item have cosines
around 0.7. Where the item centres lie is --data:

    items       (default) spread through a random 64-dimensional subspace: two items have cosines
                around 0 +- 0.13 and an item's nearest other item about 0.4, so items near a query
                lead to nearer ones.
    categories  n / 10,000 mutually orthogonal categories, each item its category's direction plus
                a random offset 0.9 times as long: all items of a category at cosine 0.55 from each
                other, all others at 0. Nothing near a wrong item leads towards the right one: a
                worst case for graph search (hnsw), which bench figures show in docs/CATALOG.md.

The queries are fresh rows of the same items, not in the catalog. Rows are generated in chunks,
so memory is the float32 catalog (4 x n x dim bytes) and the index being measured.

Each kind is built with tools/index.py's code (catalog.build_index, then save_index into a
temporary folder: bytes per vector is index.faiss's size / n), on every thread (or --threads).
The queries are then searched with catalog.search_index on ONE thread (faiss.omp_set_num_threads(1),
torch.set_num_threads(1)) in one batch, and compared with exact search for recall@10. ms per
query is the process's CPU time (on one thread, the search's own time even on a shared machine);
the wall-clock time is reported beside it. ivfpq's time includes its exact re-rank of
rerank x 10 candidates, which reads those rows of the embeddings (not counted in its bytes per
vector: the catalog keeps them on disk anyway). Ends with one JSON line: {"results": [{"kind",
"recall_at_10", "ms_per_query", "bytes_per_vector", "build_s", "ms_per_query_wall", "params"},
...], ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.catalog import (Catalog, build_index, exact_search, import_faiss, plan_index,  # noqa: E402
                           recall_at, save_index, search_index, set_threads)

LAYOUTS = ("items", "categories")
ROWS_PER_ITEM = 100
ITEM_RANK = 64  # "items": the centres' subspace
ITEMS_PER_CATEGORY = 100  # "categories"
ITEM_OFFSET = 0.9  # "categories": norm of an item's offset from its category's direction (1)
VARIATION_RANK = 32
VARIATION = 0.6  # norm of a row's variation in the shared subspace, its item's centre being 1
NOISE = 0.3  # norm of a row's isotropic noise
CHUNK_ROWS = 65_536
SWEEP = {"hnsw": [{"ef_search": ef} for ef in (16, 32, 48, 64, 96, 128, 192, 256)],
         "ivfpq": [{"nprobe": p, "rerank": r} for p in (8, 16, 32, 64) for r in (0, 4, 10)]}
OVERRIDES = ("M", "ef_construction", "ef_search", "nlist", "m", "nprobe", "rerank")


def parse_kinds(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """--kinds "flat,hnsw" -> ["flat", "hnsw"]; anything else ends with the parser's error."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    bad = [kind for kind in kinds if kind not in ("flat", "hnsw", "ivfpq")]
    if bad or not kinds:
        parser.error(f"--kinds: expected a comma-separated list of flat, hnsw, ivfpq, got {bad or 'nothing'}")
    return kinds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="catalog rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated: flat, hnsw, ivfpq")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=LAYOUTS, default="items",
                        help="items: centres spread through a 64-d subspace (default); categories: "
                             "orthogonal categories of equidistant items, a worst case for hnsw")
    parser.add_argument("--threads", type=int, default=None, help="build threads (default: all)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time hnsw's ef_search and ivfpq's nprobe x rerank over a grid")
    for name in OVERRIDES:
        parser.add_argument(f"--{name}", type=int, default=None, help="override the default (tools/catalog.py)")
    args = parser.parse_args(argv)
    args.kinds = parse_kinds(parser, args.kinds)
    for name in ("n", "dim", "queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------------
# Synthetic embeddings


class ClusteredEmbeddings:
    """Unit rows of n / ROWS_PER_ITEM items; `rows(n, stream)` draws n of them, chunk by chunk.

    layout "items": item centres spread through an ITEM_RANK-dimensional subspace, so some items
    are near each other and most are not; "categories": items in mutually orthogonal categories,
    all items of a category equally far apart (a worst case for graph search, see the docstring).
    """

    def __init__(self, n: int, dim: int, seed: int, layout: str = "items") -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.seed = dim, seed
        self.clusters = max(1, n // ROWS_PER_ITEM)
        if layout == "categories":
            categories = _unit(rng.standard_normal((max(1, self.clusters // ITEMS_PER_CATEGORY), dim),
                                                   dtype=np.float32))
            offsets = _unit(rng.standard_normal((self.clusters, dim), dtype=np.float32))
            self.centres = _unit(categories[rng.integers(len(categories), size=self.clusters)]
                                 + ITEM_OFFSET * offsets)
        elif layout == "items":
            latent = rng.standard_normal((self.clusters, min(ITEM_RANK, dim)), dtype=np.float32)
            self.centres = _unit(latent @ _orthonormal(rng, dim, latent.shape[1]).T)
        else:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.basis = _orthonormal(rng, dim, min(VARIATION_RANK, dim))

    def rows(self, n: int, stream: int) -> np.ndarray:
        """n rows (float32); another stream draws other rows of the same items."""
        out = np.empty((n, self.dim), dtype=np.float32)
        rank = self.basis.shape[1]
        for chunk, first in enumerate(range(0, n, CHUNK_ROWS)):
            rng = np.random.default_rng([self.seed, stream, chunk])
            size = min(CHUNK_ROWS, n - first)
            block = self.centres[rng.integers(self.clusters, size=size)]
            block += (VARIATION / np.sqrt(rank)) * (rng.standard_normal((size, rank), dtype=np.float32) @ self.basis.T)
            block += (NOISE / np.sqrt(self.dim)) * rng.standard_normal((size, self.dim), dtype=np.float32)
            out[first:first + size] = _unit(block)
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _orthonormal(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    """(dim, rank) float32 with orthonormal columns: a random subspace."""
    return np.linalg.qr(rng.standard_normal((dim, rank)))[0].astype(np.float32)


# ------------------------------------------------------------------------------------------
# Measuring


def timed_search(built: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Rows found and CPU and wall milliseconds per query, on one thread, all queries in one call.

    On one thread the process's CPU time is the search's own time, whatever else runs on the
    machine; the wall time also holds the waits for a core that other processes took.
    """
    faiss = import_faiss()
    threads = (faiss.omp_get_max_threads(), torch.get_num_threads())
    set_threads(1)
    try:
        search_index(built, queries[:10], k)  # warm-up: first-touch pages, lazy allocations
        start, start_cpu = time.perf_counter(), time.process_time()
        _, rows = search_index(built, queries, k)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        faiss.omp_set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    return rows, 1000 * cpu_seconds / len(queries), 1000 * seconds / len(queries)


def measure(kind: str, catalog: Catalog, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
            folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    overrides = {name: getattr(args, name) for name in OVERRIDES
                 if getattr(args, name) is not None and name in plan_index(catalog.count, catalog.dim, kind).params}
    print(f"{kind}: building {catalog.count} x {catalog.dim}" + (f" with {overrides}" if overrides else ""),
          flush=True)
    built = build_index(catalog, kind, sample=0, seed=args.seed, threads=args.threads,
                        progress=lambda text: print(f"  {text}", flush=True), **overrides)
    save_index(built, folder)
    k = truth.shape[1]
    rows, ms, wall_ms = timed_search(built, queries, k)
    result = {"kind": kind, "recall_at_10": round(recall_at(rows, truth), 4), "ms_per_query": round(ms, 4),
              "ms_per_query_wall": round(wall_ms, 4), "bytes_per_vector": built.info["bytes_per_vector"],
              "build_s": built.info["build_seconds"], "params": dict(built.params)}
    print(f"  {format_row(result)}", flush=True)
    sweep = []
    if args.sweep and kind in SWEEP:
        defaults = dict(built.params)
        for values in SWEEP[kind]:
            built.params.update(values)
            rows, ms, wall_ms = timed_search(built, queries, k)
            sweep.append({**result, "recall_at_10": round(recall_at(rows, truth), 4), "ms_per_query": round(ms, 4),
                          "ms_per_query_wall": round(wall_ms, 4), "params": dict(built.params)})
            print(f"  sweep {format_row(sweep[-1])}", flush=True)
        built.params.update(defaults)
    return result, sweep


def format_row(result: dict[str, Any]) -> str:
    params = ", ".join(f"{key} {value}" for key, value in result["params"].items()) or "-"
    return (f"{result['kind']:<7}{result['build_s']:>10.1f}{result['bytes_per_vector']:>12.1f}"
            f"{result['recall_at_10']:>11.4f}{result['ms_per_query']:>11.3f}{result['ms_per_query_wall']:>11.3f}"
            f"  {params}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    data = ClusteredEmbeddings(args.n, args.dim, args.seed, args.data)
    embeddings = data.rows(args.n, stream=1)
    queries = data.rows(args.queries, stream=2)
    print(f"{args.n} x {args.dim} float32 rows of {data.clusters} items, layout {args.data} "
          f"({embeddings.nbytes / 2**30:.2f} GiB), "
          f"{args.queries} queries, made in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    _, truth = exact_search(embeddings, queries, min(10, args.n))
    print(f"exact search for the ground truth: {time.perf_counter() - start:.1f} s on "
          f"{torch.get_num_threads()} threads", flush=True)
    results, sweeps = [], []
    with tempfile.TemporaryDirectory(prefix="bench_index_") as folder:
        catalog = Catalog.from_array(embeddings, folder, fingerprint=f"synthetic-{args.seed}")
        for kind in args.kinds:
            result, sweep = measure(kind, catalog, queries, truth, args, Path(folder))
            results.append(result)
            sweeps.extend(sweep)
    print(f"\n{args.n} rows x {args.dim}, {args.queries} queries; query time on 1 thread, build on "
          f"{args.threads or import_faiss().omp_get_max_threads()}")
    print(f"{'kind':<7}{'build s':>10}{'bytes/vec':>12}{'recall@10':>11}{'ms/query':>11}{'wall ms':>11}  parameters")
    for result in results:
        print(format_row(result))
    summary = {"bench": "index", "n": args.n, "dim": args.dim, "queries": args.queries, "seed": args.seed,
               "data": args.data,
               "results": results}
    if sweeps:
        summary["sweep"] = sweeps
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
