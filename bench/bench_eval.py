"""Time and memory of retrieval_metrics at In-Shop size, against a naive full-matrix version.

    python bench/bench_eval.py [--num-query 14218 --num-gallery 12612 --num-items 3985 --dim 2048]

Embeddings are random 2048-d vectors around one random centre per item, with the In-Shop label
structure (3,985 items, each with at least one query and one gallery image). Each method runs in
a fresh subprocess on the same data (same seed), so its peak resident memory (VmHWM, reset after
the data are built) measures only what the method needs above the embeddings. The naive method
builds the full similarity matrix and fully sorts every row; both must give the same metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcface.metrics import retrieval_metrics  # noqa: E402

RECALL_AT = (1, 5, 10)
MAP_AT = (10,)
METHODS = ("chunked", "naive")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The random In-Shop-size embeddings that make_data draws (bench_rerank takes them too)."""
    parser.add_argument("--num-query", type=int, default=14218)
    parser.add_argument("--num-gallery", type=int, default=12612)
    parser.add_argument("--num-items", type=int, default=3985)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--noise", type=float, default=3.25, help="per-dimension noise around item centres")
    parser.add_argument("--seed", type=int, default=0)


def check_data_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_items > min(args.num_query, args.num_gallery):
        parser.error("--num-items must not exceed --num-query or --num-gallery (every item has both)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(parser)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # set for the subprocesses
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    return args


def item_labels(num_images: int, num_items: int, generator: torch.Generator) -> torch.Tensor:
    """Every item once, the remaining images spread uniformly over items, in random order."""
    extra = torch.randint(num_items, (num_images - num_items,), generator=generator)
    labels = torch.cat([torch.arange(num_items), extra])
    return labels[torch.randperm(num_images, generator=generator)]


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    query_labels = item_labels(args.num_query, args.num_items, generator)
    gallery_labels = item_labels(args.num_gallery, args.num_items, generator)
    centres = torch.randn(args.num_items, args.dim, generator=generator)
    query = torch.randn(args.num_query, args.dim, generator=generator).mul_(args.noise)
    query += centres[query_labels]
    gallery = torch.randn(args.num_gallery, args.dim, generator=generator).mul_(args.noise)
    gallery += centres[gallery_labels]
    return query, gallery, query_labels, gallery_labels


def naive_metrics(
    query: torch.Tensor, gallery: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor
) -> dict[str, float]:
    """Full (Q, G) similarity matrix, every row fully sorted, metrics from the whole ranking."""
    query_unit = torch.nn.functional.normalize(query, dim=1)
    gallery_unit = torch.nn.functional.normalize(gallery, dim=1)
    order = torch.argsort(query_unit @ gallery_unit.T, dim=1, descending=True, stable=True)
    relevant = gallery_labels[order] == query_labels[:, None]  # (Q, G)
    total_relevant = relevant.sum(dim=1)
    relevant, total_relevant = relevant[total_relevant > 0], total_relevant[total_relevant > 0]
    metrics = {f"recall@{k}": 100.0 * relevant[:, :k].any(dim=1).double().mean().item() for k in RECALL_AT}
    for k in MAP_AT:
        hits = relevant[:, :k].double()
        precision = hits.cumsum(dim=1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
        average_precision = (precision * hits).sum(dim=1) / total_relevant
        metrics[f"mAP@{k}"] = 100.0 * average_precision.mean().item()
    metrics["num_queries"] = int(relevant.shape[0])
    return metrics


def peak_memory_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def reset_peak_memory() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def run_method(args: argparse.Namespace) -> dict[str, object]:
    """Inside a subprocess: build the data, then time one method and its peak memory above it."""
    data = make_data(args)
    reset_peak_memory()
    baseline_kib = peak_memory_kib()
    start, start_cpu = time.perf_counter(), time.process_time()
    if args.method == "chunked":
        metrics = retrieval_metrics(*data, recall_at=RECALL_AT, map_at=MAP_AT, chunk_size=args.chunk_size)
    else:
        metrics = naive_metrics(*data)
    seconds = time.perf_counter() - start
    # CPU time (all threads) shows the cost when other processes share the cores.
    cpu_seconds = time.process_time() - start_cpu
    peak_mib = (peak_memory_kib() - baseline_kib) / 1024
    embeddings_mib = (data[0].nbytes + data[1].nbytes) / 2**20
    return dict(
        method=args.method, seconds=seconds, cpu_seconds=cpu_seconds, peak_mib=peak_mib,
        embeddings_mib=embeddings_mib, metrics=metrics,
    )


def run_in_subprocess(method: str, argv: list[str]) -> dict[str, object]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--method", method]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"bench_eval.py --method {method} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def same_metrics(first: dict[str, float], second: dict[str, float]) -> bool:
    # Recall counts are exact; mAP sums are float64 added in a different order (chunks).
    keys = [key for key in second if key in first]
    return all(math.isclose(first[key], second[key], rel_tol=1e-12, abs_tol=1e-12) for key in keys)


def main() -> None:
    args = parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    argv = sys.argv[1:]
    results = {method: run_in_subprocess(method, argv) for method in METHODS}
    chunked, naive = results["chunked"], results["naive"]
    if not same_metrics(chunked["metrics"], naive["metrics"]):
        raise AssertionError(f"chunked and naive metrics differ:\n{chunked['metrics']}\n{naive['metrics']}")

    print(
        f"{args.num_query} queries x {args.num_gallery} gallery, {args.dim}-d float32, "
        f"{args.num_items} items, embeddings {chunked['embeddings_mib']:.0f} MiB, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'method':<10}{'seconds':>10}{'CPU s':>8}{'peak MiB above embeddings':>28}"
        f"{'recall@1':>10}{'mAP@10':>9}"
    )
    for method, result in results.items():
        print(
            f"{method:<10}{result['seconds']:>10.2f}{result['cpu_seconds']:>8.1f}"
            f"{result['peak_mib']:>28.0f}"
            f"{result['metrics']['recall@1']:>10.2f}{result['metrics']['mAP@10']:>9.2f}"
        )
    print("metrics identical: yes")
    summary = {
        "bench": "retrieval_metrics",
        "num_query": args.num_query,
        "num_gallery": args.num_gallery,
        "dim": args.dim,
        "chunk_size": args.chunk_size,
        "chunked_s": round(chunked["seconds"], 3),
        "chunked_cpu_s": round(chunked["cpu_seconds"], 3),
        "chunked_peak_mib": round(chunked["peak_mib"], 1),
        "naive_s": round(naive["seconds"], 3),
        "naive_cpu_s": round(naive["cpu_seconds"], 3),
        "naive_peak_mib": round(naive["peak_mib"], 1),
        "recall@1": chunked["metrics"]["recall@1"],
        "mAP@10": chunked["metrics"]["mAP@10"],
        "identical": True,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
