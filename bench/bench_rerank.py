"""Time and peak memory of re-ranked evaluation (arcface.rerank) at In-Shop size.

    python bench/bench_rerank.py [--num-query 14218 --num-gallery 12612 --num-items 3985 --dim 2048]
        [--methods none qe kr] [--qe_k 3 --qe_alpha 500 --kr_k1 20 --kr_k2 6 --kr_lambda 0.3]

The data are bench_eval.py's: random 2048-d vectors around one random centre per item, with the
In-Shop label structure. Each method (none = plain retrieval_metrics, qe, kr with the default
parameters unless given) runs in a fresh subprocess on the same data, and its peak resident memory (VmHWM,
reset after the data are built) measures what it needs above the embeddings, as in bench_eval.py.
kr is Zhong et al.'s published re_ranking (its k1, k2 and lambda; arcface/rerank.py). A naive
k-reciprocal re-ranking, as that code is written, would hold (Q + G)^2 float32 distances (In-Shop:
2.9 GB), as many V entries and an (N, N) ranking.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcface.rerank import (KR_K1, KR_K2, KR_LAMBDA, QE_ALPHA, QE_K, RERANK_METHODS, Rerank,  # noqa: E402
                            reranked_metrics)
from bench.bench_eval import MAP_AT, RECALL_AT, add_data_args, check_data_args, make_data, peak_memory_kib, reset_peak_memory  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--methods", nargs="+", choices=RERANK_METHODS, default=list(RERANK_METHODS))
    parser.add_argument("--qe_k", type=int, default=QE_K)
    parser.add_argument("--qe_alpha", type=float, default=QE_ALPHA)
    parser.add_argument("--kr_k1", type=int, default=KR_K1)
    parser.add_argument("--kr_k2", type=int, default=KR_K2)
    parser.add_argument("--kr_lambda", type=float, default=KR_LAMBDA)
    parser.add_argument("--method", choices=RERANK_METHODS, help=argparse.SUPPRESS)  # set for the subprocesses
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    return args


def settings(args: argparse.Namespace, method: str) -> Rerank:
    return Rerank(method, qe_k=args.qe_k, qe_alpha=args.qe_alpha, kr_k1=args.kr_k1, kr_k2=args.kr_k2,
                  kr_lambda=args.kr_lambda)


def run_method(args: argparse.Namespace) -> dict[str, object]:
    """Inside a subprocess: build the data, then time one method and its peak memory above it."""
    data = make_data(args)
    reset_peak_memory()
    baseline_kib = peak_memory_kib()
    start, start_cpu = time.perf_counter(), time.process_time()
    metrics = reranked_metrics(*data, settings(args, args.method), recall_at=RECALL_AT, map_at=MAP_AT)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu  # all threads: the cost on shared cores
    peak_mib = (peak_memory_kib() - baseline_kib) / 1024
    embeddings_mib = (data[0].nbytes + data[1].nbytes) / 2**20
    return dict(method=args.method, seconds=seconds, cpu_seconds=cpu_seconds, peak_mib=peak_mib,
                embeddings_mib=embeddings_mib, metrics=metrics)


def run_in_subprocess(method: str, argv: list[str]) -> dict[str, object]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--method", method]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"bench_rerank.py --method {method} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    argv = sys.argv[1:]
    results = {method: run_in_subprocess(method, argv) for method in args.methods}
    first = next(iter(results.values()))
    print(f"{args.num_query} queries x {args.num_gallery} gallery, {args.dim}-d float32, {args.num_items} items, "
          f"embeddings {first['embeddings_mib']:.0f} MiB, {torch.get_num_threads()} threads")
    print(f"{'rerank':<8}{'seconds':>10}{'CPU s':>8}{'peak MiB above embeddings':>28}{'recall@1':>10}{'mAP@10':>9}")
    for method, result in results.items():
        parameters = ", ".join(f"{key} {value:g}" for key, value in settings(args, method).describe().items()
                               if key != "method")
        print(f"{method:<8}{result['seconds']:>10.1f}{result['cpu_seconds']:>8.1f}{result['peak_mib']:>28.0f}"
              f"{result['metrics']['recall@1']:>10.2f}{result['metrics']['mAP@10']:>9.2f}  {parameters}")
    summary = {"bench": "rerank", "num_query": args.num_query, "num_gallery": args.num_gallery, "dim": args.dim,
               "threads": torch.get_num_threads()}
    for method, result in results.items():
        summary[f"{method}_s"] = round(result["seconds"], 2)
        summary[f"{method}_cpu_s"] = round(result["cpu_seconds"], 2)
        summary[f"{method}_peak_mib"] = round(result["peak_mib"], 1)
        summary[f"{method}_recall@1"] = result["metrics"]["recall@1"]
        summary[f"{method}_mAP@10"] = result["metrics"]["mAP@10"]
        summary[f"{method}_settings"] = settings(args, method).describe()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
